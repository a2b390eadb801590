"""`prepare` and `embed` on 1K, 10K, 100K generated Karpathy images: how time and memory grow.

Small photos and the smoke-size encoder (configs/karpathy_local.py, 5 captions an image), whose
training runs a fixed `--encoder-steps` (it does not grow with the data; embed's extraction
seconds are reported apart). Prints a table and writes a JSON results file.

    python benchmarks/data_growth.py --sizes 1000,10000,100000 \\
        --out benchmarks/results/data_growth.json

See avg_jax/bench/growth.py for what is measured.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax.artifacts import io  # noqa: E402
from avg_jax.bench import common, growth  # noqa: E402
from avg_jax.errors import UserError  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="1000,10000,100000", help="image counts (%(default)s)")
  p.add_argument("--root", default=os.path.join("runs", "data_growth"))
  p.add_argument("--out", default="", help="results JSON (default: <root>/data_growth.json)")
  p.add_argument("--config", default="configs/karpathy_local.py:captions=5")
  p.add_argument("--encoder-steps", type=int, default=20)
  p.add_argument("--photo", default="64x48", help="stored photo size WxH (%(default)s)")
  p.add_argument("--render", type=int, default=32, help="scene render size (%(default)s)")
  p.add_argument("--override", action="append", default=[], help="config override KEY=VALUE")
  p.add_argument("--keep", action="store_true", help="keep each size's data and workdir")
  args = p.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  photo = tuple(int(x) for x in args.photo.split("x"))
  # The generated captions come from a small grammar: SentencePiece finds at most ~420 pieces
  # in them, under karpathy_local's 500, whatever N is.
  overrides = [
    f"encoder_train.steps={args.encoder_steps}",
    "text_tokenizer.vocab_size=384",
    *args.override,
  ]
  rows = []
  try:
    for n in sizes:
      rows.append(
        growth.run_size(
          n, os.path.abspath(args.root), args.config, overrides, photo, args.render, keep=args.keep
        )
      )
      print(growth.table(rows[-1:]).splitlines()[-1], flush=True)
  except UserError as e:
    print(f"data_growth: error: {e}", file=sys.stderr)
    return 2
  command = " ".join(
    ["python", "benchmarks/data_growth.py", *(argv if argv is not None else sys.argv[1:])]
  )
  results = {
    "config": args.config,
    "overrides": overrides,
    "photo": list(photo),
    "rows": rows,
    "machine": common.machine_info(command=command),
  }
  out = args.out or os.path.join(args.root, "data_growth.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  io.write_json(out, results)  # atomic: a killed run leaves no half-written results
  print(growth.table(rows))
  print(f"results in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
