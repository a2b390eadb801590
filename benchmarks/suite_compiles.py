"""Where the test suite's XLA compile time goes, and which programs it compiles twice.

A pytest plugin and its report. Run the suite with the plugin, then summarise:

    SUITE_COMPILES_DIR=/tmp/sc PYTHONPATH=benchmarks JAX_PLATFORMS=cpu \\
        XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python -m pytest -q \\
        -p suite_compiles -p no:cacheprovider -n 2 --dist loadgroup tests
    python benchmarks/suite_compiles.py --dir /tmp/sc --out benchmarks/results/suite_compiles.json

Every backend compile in a test process is recorded with the test that caused it (its setup
included), the program's name, its seconds and a hash of the lowered module (without debug
locations); so are jax's timings of the tracing and lowering before it. A compile whose
module hash the same process compiled before is a *recompile*: the same program built again,
which reusing the jitted function (a module-level function with static settings) would have
avoided. The CLI and server subprocesses that tests start are not seen. The hook wraps
`jax._src.compiler.backend_compile_and_load` (jax 0.10 here): a private function, so a newer
jax may need this tool updated; the product never imports it.
"""

import argparse
import collections
import glob
import hashlib
import json
import os
import sys
import time

ENV = "SUITE_COMPILES_DIR"
# jax's duration events of the steps before XLA's backend compile -> the report's names.
PHASES = {
  "/jax/core/compile/jaxpr_trace_duration": "trace",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
}
_current = {"test": None}


# ---------------------------------------------------------------------------------------------
# The pytest plugin (`-p suite_compiles`)
# ---------------------------------------------------------------------------------------------


def pytest_configure(config):
  directory = os.environ.get(ENV)
  if not directory:
    raise RuntimeError(f"suite_compiles: set {ENV} to the folder for the records")
  os.makedirs(directory, exist_ok=True)
  worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
  out = open(os.path.join(directory, f"{worker}.jsonl"), "w")
  from jax._src import compiler

  original = compiler.backend_compile_and_load

  def recorded(backend, module, devices, options, host_callbacks):
    text = module.operation.get_asm(enable_debug_info=False)
    start = time.perf_counter()
    executable = original(backend, module, devices, options, host_callbacks)
    out.write(
      json.dumps(
        {
          "test": _current["test"],
          "name": str(module.operation.attributes["sym_name"]).strip('"'),
          "hash": hashlib.sha1(text.encode()).hexdigest()[:16],
          "devices": len(devices),
          "seconds": time.perf_counter() - start,
        }
      )
      + "\n"
    )
    out.flush()
    return executable

  compiler.backend_compile_and_load = recorded

  # jax's own timings of the steps before the backend compile (public monitoring events).
  from jax import monitoring

  def phase(event, seconds, **_):
    if event in PHASES:
      out.write(
        json.dumps({"test": _current["test"], "phase": PHASES[event], "seconds": seconds}) + "\n"
      )

  monitoring.register_event_duration_secs_listener(phase)


def pytest_runtest_setup(item):
  _current["test"] = item.nodeid


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def summarise(processes: dict[str, list[dict]], top: int = 15) -> dict:
  """`{process: [records in compile order]}` -> totals, recompiles by program name, and the
  tests with the most compile time."""
  total = recompiled = 0.0
  count = recompiles = 0
  by_name = collections.defaultdict(lambda: [0, 0.0])
  by_test = collections.defaultdict(lambda: [0.0, 0.0])
  phases = collections.Counter()
  for records in processes.values():
    seen = set()
    for r in records:
      if "phase" in r:  # tracing or lowering, before a backend compile
        phases[r["phase"]] += r["seconds"]
        continue
      total += r["seconds"]
      count += 1
      by_test[r["test"]][0] += r["seconds"]
      if r["hash"] in seen:
        recompiled += r["seconds"]
        recompiles += 1
        by_name[r["name"]][0] += 1
        by_name[r["name"]][1] += r["seconds"]
        by_test[r["test"]][1] += r["seconds"]
      seen.add(r["hash"])
  names = sorted(by_name.items(), key=lambda kv: -kv[1][1])
  tests = sorted(by_test.items(), key=lambda kv: -kv[1][0])[:top]
  return {
    "compiles": count,
    "compile_s": round(total, 1),
    "trace_s": round(phases["trace"], 1),
    "lower_s": round(phases["lower"], 1),
    "recompiles": recompiles,
    "recompile_s": round(recompiled, 1),
    "recompiled_programs": [{"name": n, "count": c, "seconds": round(s, 1)} for n, (c, s) in names],
    "top_tests": [
      {"test": t, "compile_s": round(s, 1), "recompile_s": round(d, 1)} for t, (s, d) in tests
    ],
  }


def table(summary: dict) -> str:
  lines = [
    f"compiles {summary['compiles']}, {summary['compile_s']} s; recompiles of an "
    f"identical program {summary['recompiles']}, {summary['recompile_s']} s",
    f"before them: tracing {summary['trace_s']} s, lowering to MLIR {summary['lower_s']} s",
    "",
    f"{'recompiled program':40s} {'count':>6s} {'seconds':>8s}",
  ]
  lines += [
    f"{r['name'][:40]:40s} {r['count']:6d} {r['seconds']:8.1f}"
    for r in summary["recompiled_programs"]
  ]
  lines += ["", f"{'compile s':>9s} {'recompile s':>11s}  test"]
  lines += [
    f"{r['compile_s']:9.1f} {r['recompile_s']:11.1f}  {r['test']}" for r in summary["top_tests"]
  ]
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dir", required=True, help=f"the plugin's folder (${ENV})")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  files = sorted(glob.glob(os.path.join(args.dir, "*.jsonl")))
  if not files:
    print(f"suite_compiles: no records in {args.dir}", file=sys.stderr)
    return 2
  processes = {
    os.path.basename(f): [json.loads(line) for line in open(f) if line.strip()] for f in files
  }
  summary = summarise(processes)
  print(table(summary))
  command = " ".join(
    ["python", "benchmarks/suite_compiles.py", *(argv if argv is not None else sys.argv[1:])]
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(dict(summary, command=command), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
