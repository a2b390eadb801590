"""`avg-jax`: the command line over the pipeline's stages (avg_jax/stages) and the tools.

    avg-jax STAGE --config configs/smoke.py[:arg] --workdir W [--config.key=value ...] [--debug]
    avg-jax run --config ... --workdir W [--until STAGE]            (the stages in order)
    avg-jax bench NAME [--config ...] [--workdir W]
    avg-jax compile --config C --topology v5e:4x4 [--out F.json]   (TPU AOT, libtpu extra)
    avg-jax search --model EXPORT "a query"                         (answer queries)
    avg-jax serve --model EXPORT [--host H] [--port P]              (HTTP search service)
    avg-jax index add|remove|list --model EXPORT ...                (the live index)

Every stage is a module of avg_jax.stages with `run(config, workdir) -> None`. The commands
over an export are front ends beside this dispatcher: search.py, index.py and serve.py (the
HTTP service itself is avg_jax/serve/). User errors (`UserError`) and a full disk print one
line and exit 2; `--debug` shows tracebacks.
"""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from avg_jax.errors import Preempted, UserError
from avg_jax.stages import PIPELINE

# Benchmarks: modules of avg_jax.bench whose `run(config, workdir, args)` writes
# <workdir>/bench_NAME.json.
BENCHES = ("embed", "tokenize", "t5", "decode", "train", "data", "serve")

DEFAULT_CONFIG = os.path.join("configs", "smoke.py")


def stage_module(name: str) -> ModuleType:
  """The stage `name` (one of PIPELINE): its module alone, imported on first use (spelled out,
  not built from the name, so that the package layout test sees each import). A one-stage
  command imports only its stage: all seven cost a stage process ~1.3 s CPU more at start
  (evaluate's report brings matplotlib)."""
  match name:
    case "prepare":
      from avg_jax.stages import prepare

      return prepare
    case "embed":
      from avg_jax.stages import embed

      return embed
    case "tokenize":
      from avg_jax.stages import tokenize

      return tokenize
    case "train":
      from avg_jax.stages import train

      return train
    case "rank":
      from avg_jax.stages import rank

      return rank
    case "evaluate":
      from avg_jax.stages import evaluate

      return evaluate
    case "export":
      from avg_jax.stages import export

      return export
    case _:
      raise ValueError(f"unknown stage {name!r} (one of {', '.join(PIPELINE)})")


def stage_modules() -> dict[str, ModuleType]:
  """`{name: module}` of the pipeline's stages, in order (imported on first use, so that
  `--help`, `search` and `serve` start without them)."""
  return {name: stage_module(name) for name in PIPELINE}


def bench_module(name: str) -> ModuleType:
  """The benchmark `name` (one of BENCHES): its module alone, imported on first use (spelled
  out, not built from the name, so that the package layout test sees each import)."""
  match name:
    case "embed":
      from avg_jax.bench import embed

      return embed
    case "tokenize":
      from avg_jax.bench import tokenize

      return tokenize
    case "t5":
      from avg_jax.bench import t5

      return t5
    case "decode":
      from avg_jax.bench import decode

      return decode
    case "train":
      from avg_jax.bench import train

      return train
    case "data":
      from avg_jax.bench import data

      return data
    case "serve":
      from avg_jax.bench import serve

      return serve
    case _:
      raise UserError(f"unknown benchmark {name!r} (one of {', '.join(BENCHES)})")


def _split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments."""
  rest, overrides = [], []
  i = 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      body = arg[len("--config.") :]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise UserError(f"config override {arg} has no value")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="avg-jax", description="AVG: text-to-image retrieval as voken generation (JAX)."
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  def common(p):
    p.add_argument(
      "--config",
      default=DEFAULT_CONFIG,
      help="config file[:arg], e.g. configs/smoke.py:tiny (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")

  for name in PIPELINE:
    p = sub.add_parser(name, help=f"run the {name} stage")
    common(p)
    p.add_argument("--workdir", required=True, help="where the stage reads and writes")
  p = sub.add_parser("run", help="all stages in order: " + " -> ".join(PIPELINE))
  common(p)
  p.add_argument("--workdir", required=True)
  p.add_argument(
    "--until",
    choices=PIPELINE,
    default=PIPELINE[-1],
    help="the last stage to run (default: %(default)s)",
  )
  p = sub.add_parser("bench", help="run a benchmark: " + ", ".join(BENCHES))
  common(p)
  p.add_argument("name", choices=sorted(BENCHES))
  p.add_argument("--workdir", default=os.path.join("runs", "bench"))
  p.add_argument("--quick", action="store_true", help="smallest sizes only (for tests)")
  p.add_argument(
    "--accelerator",
    action="store_true",
    help="bench train: measure on the attached GPU/TPU (bfloat16, paper batch)",
  )
  p.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="bench train --accelerator: peak TFLOP/s of one device, for MFU",
  )
  p.add_argument(
    "--model", default="", help="bench serve: export to serve (default: <workdir>/export)"
  )
  p.add_argument(
    "--clients", default="1,8,64", help="bench serve: concurrent client counts (%(default)s)"
  )
  p.add_argument(
    "--duration",
    type=float,
    default=60.0,
    help="bench serve: seconds per client count (%(default)s)",
  )
  p.add_argument(
    "--hostile",
    type=int,
    default=0,
    help="bench serve: also run each level with N hostile clients mixed in",
  )
  p = sub.add_parser(
    "compile",
    help="ahead-of-time compile the steps for a TPU topology "
    "(needs the libtpu extra: requirements-tpu.txt)",
  )
  common(p)
  p.add_argument(
    "--topology",
    required=True,
    help="TPU slice, e.g. v5e:4x4, v4:2x2x4, v5p:2x2x1 (or v5e-16, v4-32, v5p-8)",
  )
  p.add_argument("--out", default="", help="write the report as JSON to this path")
  p = sub.add_parser("search", help="answer queries with an exported model")
  p.add_argument("--model", required=True, help="exported serving checkpoint directory")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--json", action="store_true", help="one JSON object per query")
  p.add_argument("--debug", action="store_true")
  p.add_argument("queries", nargs="*", help="queries (default: one per line on stdin)")
  from avg_jax.cli import index  # argparse only here; the Retriever loads lazily

  index.add_arguments(sub)

  p = sub.add_parser("serve", help="HTTP search service and search page for an export")
  from avg_jax.serve import options  # argparse only: cheap

  options.add_arguments(p)
  p.add_argument("--debug", action="store_true")
  return parser


def _setup_runtime() -> None:
  from avg_jax import runtime

  # Every command runs under the process settings the benchmarks measure with.
  runtime.prefer_heap_allocations()
  # grain's multiprocess workers read absl flags; mark them parsed once for the whole CLI.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
  if args.command == "search":
    if overrides:
      raise UserError("search takes no --config overrides (the exported model has its config)")
    from avg_jax.cli import search

    return search.main(args)
  if args.command == "index":
    if overrides:
      raise UserError("index takes no --config overrides (the exported model has its config)")
    from avg_jax.cli import index

    return index.main(args)
  if args.command == "serve":
    if overrides:
      raise UserError("serve takes no --config overrides (the exported model has its config)")
    from avg_jax.cli import serve

    return serve.main(args)

  from avg_jax import config as config_lib
  from avg_jax import partitioning

  config = config_lib.load_config(args.config, overrides)
  with partitioning.rules_in_use(config.partitioning.rules):
    return _run_with_config(args, config, overrides)


def _run_with_config(args, config, overrides) -> int:
  """A command that reads the config, inside its sharding rules table."""
  from avg_jax import partitioning

  if args.command == "compile":
    # Ahead-of-time: one host process compiles for the whole slice; no distributed runtime.
    argv = [
      "compile",
      "--config",
      args.config,
      "--topology",
      args.topology,
      *(["--out", args.out] if args.out else []),
      *(f"--config.{o}" for o in overrides),
    ]
    from avg_jax.aot import command

    command.run(config, args, argv)
    return 0
  bench = bench_module(args.name) if args.command == "bench" else None
  needs_stages: tuple[str, ...] = getattr(bench, "NEEDS_STAGES", ())
  if bench is None or needs_stages:
    # Every input path the stages need, before any work (and before joining other processes).
    from avg_jax.stages import inputs

    inputs.check(config)
  partitioning.maybe_initialize_distributed(config.distributed)
  if bench is not None:
    for name in needs_stages:
      stage_module(name).run(config, args.workdir)
    bench.run(config, args.workdir, args)
    return 0
  if args.command == "run":
    names = PIPELINE[: PIPELINE.index(args.until) + 1]
  else:
    names = (args.command,)
  for name in names:
    stage_module(name).run(config, args.workdir)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  debug = "--debug" in argv
  try:
    rest, overrides = _split_config_overrides(argv)
    args = _parser().parse_args(rest)
    _setup_runtime()
    return _run(args, overrides)
  except UserError as e:
    if debug:
      raise
    print(f"avg-jax: error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    # Exit like a process ended by SIGTERM, after the checkpoint is safely written.
    print(f"avg-jax: {e}", file=sys.stderr)
    return 143
  except KeyboardInterrupt:
    print("avg-jax: interrupted", file=sys.stderr)
    return 130
  except Exception as e:
    # A full disk is the user's to fix, whichever writer met it: one line, not a traceback
    # (the writers remove their temporary files on the way out).
    from avg_jax.artifacts import io

    if debug or not io.disk_full(e):
      raise
    where = io.failed_path(e)
    print(
      f"avg-jax: error: no space left on device{': ' + where if where else ''}; free "
      f"space and rerun",
      file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
  sys.exit(main())
