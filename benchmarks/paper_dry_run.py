"""The paper configs end to end at their real shapes on this CPU (issue 18): a dry run.

Writes a fake paper world (Hugging Face CLIP ViT-L/14-336 and T5 directories with random
weights, T5's 32 000-piece SentencePiece layout, a Karpathy-format dataset of generated photos
and a pseudo-query file), runs every stage as README's "Reproducing the paper on Cloud TPU"
tells a user, with only the paths and step counts changed (see avg_jax/bench/dry_run.py), and
prints per-stage wall time, peak RSS, throughput and the time of a full paper epoch here,
beside the TPU step times `avg-jax compile` predicted. Writes a JSON results file.

    python benchmarks/paper_dry_run.py --config configs/flickr30k.py --root runs/dry_flickr \\
        --out benchmarks/results/dry_run_flickr30k_t5-base.json
    python benchmarks/paper_dry_run.py --config configs/coco.py:t5-base --root runs/dry_coco \\
        --out benchmarks/results/dry_run_coco_t5-base.json
    python benchmarks/paper_dry_run.py --size tiny --root /tmp/dry_tiny --out /tmp/tiny.json

`--size tiny`: tiny model shapes and data, T5's real tokenizer layout, the same config path
(the test suite's). The world is kept under <root>/world and reused by a rerun.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax.artifacts import io  # noqa: E402
from avg_jax.bench import dry_run, paper_world  # noqa: E402
from avg_jax.errors import UserError  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _default_aot(config: str) -> list[str]:
  """The AOT reports of this config in benchmarks/results (v4-32, v5e-16), when present."""
  dataset = dry_run.dataset_of(config)
  arg = config.partition(":")[2] or ("t5-large" if dataset == "coco" else "t5-base")
  return [os.path.join(RESULTS, f"aot_{dataset}_{arg}_{s}.json") for s in ("v4-32", "v5e-16")]


def _images(text: str) -> tuple[int, int, int]:
  parts = tuple(int(x) for x in text.split(","))
  if len(parts) != 3 or min(parts) < 1:
    raise argparse.ArgumentTypeError("expected TRAIN,VAL,TEST image counts, e.g. 64,16,16")
  return parts


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="configs/flickr30k.py")
  p.add_argument("--root", required=True, help="world, workdir and logs go here")
  p.add_argument("--out", default="", help="results JSON (default: <root>/dry_run.json)")
  p.add_argument("--size", choices=sorted(paper_world.WORLD_SIZES), default="paper")
  p.add_argument(
    "--images",
    type=_images,
    default=None,
    help="TRAIN,VAL,TEST generated images (default: the size's)",
  )
  p.add_argument(
    "--steps",
    type=int,
    nargs=3,
    metavar=("TOKENIZER", "TRAIN", "RANK"),
    default=None,
    help="step counts (default: 5 5 4; tiny: 3 3 3)",
  )
  p.add_argument(
    "--aot",
    action="append",
    default=None,
    help="`avg-jax compile --out` reports to show (default: this config's in "
    "benchmarks/results for v4-32 and v5e-16)",
  )
  p.add_argument(
    "--override",
    action="append",
    default=[],
    help="another config override KEY=VALUE (say why in the results)",
  )
  args = p.parse_args(argv)
  size = paper_world.WORLD_SIZES[args.size]
  if args.images:
    size = dataclasses.replace(size, images=args.images)
  steps = None
  if args.steps:
    steps = dict(zip(("tokenizer.steps", "train.steps", "rank.steps"), args.steps))
  try:
    results = dry_run.dry_run(
      args.config,
      os.path.abspath(args.root),
      size=args.size,
      world_size=size,
      steps=steps,
      extra=args.override,
      aot_files=args.aot
      if args.aot is not None
      else _default_aot(args.config)
      if args.size == "paper"
      else [],
    )
  except UserError as e:
    print(f"paper_dry_run: error: {e}", file=sys.stderr)
    return 2
  results["machine"]["command"] = " ".join(
    ["python", "benchmarks/paper_dry_run.py", *(argv if argv is not None else sys.argv[1:])]
  )
  out = args.out or os.path.join(args.root, "dry_run.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  io.write_json(out, results)  # atomic: a killed run leaves no half-written results
  print(dry_run.table(results))
  print(f"total {results['total_wall_s']} s; results in {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
