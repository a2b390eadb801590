"""Rank's candidate scoring, per (query, candidate) pair vs packed: FLOPs, memory, step time.

    python benchmarks/rank_scoring.py --config configs/flickr30k.py:t5-base --batch 2 \\
        --out benchmarks/results/rank_scoring_t5-base.json

See avg_jax/bench/rank_scoring.py for what is measured.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax.artifacts import io  # noqa: E402
from avg_jax.bench import common, rank_scoring  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/flickr30k.py:t5-base")
  p.add_argument("--batch", type=int, default=2, help="queries per step (%(default)s)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  rows = rank_scoring.measure(args.config, args.batch, args.rounds)
  print(rank_scoring.table(rows))
  command = " ".join(
    ["python", "benchmarks/rank_scoring.py", *(argv if argv is not None else sys.argv[1:])]
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  io.write_json(
    args.out,
    {
      "config": args.config,
      "batch": args.batch,
      "rows": rows,
      "machine": common.machine_info(command=command),
    },
  )
  print(f"results in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
