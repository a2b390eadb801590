"""Running pipeline stages as `avg-jax STAGE` subprocesses and measuring each one.

`run_stage` starts `python -m avg_jax STAGE --config ... --workdir ... --config.k=v ...` (what
a user types), waits for it with `os.wait4` and returns its wall time, CPU time and peak
resident memory (the child's `ru_maxrss`: each stage has its own process, so its peak is its
own). The records it appended to `<workdir>/metrics.jsonl` are returned with it, for the
throughput each stage reports (`throughput`).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from avg_jax.errors import UserError

# The pipeline's stages in order (avg_jax/stages/__init__.py; a tool never imports a stage).
STAGES = ("prepare", "embed", "tokenize", "train", "rank", "evaluate", "export")


@dataclasses.dataclass
class StageRun:
  stage: str
  wall_s: float
  user_s: float
  sys_s: float
  peak_rss_mib: float
  records: list[dict]  # metrics.jsonl records the stage appended
  log: str  # its stdout + stderr file


def _metrics_size(workdir: str) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.getsize(path) if os.path.exists(path) else 0


def _records_after(workdir: str, offset: int) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    f.seek(offset)
    return [json.loads(line) for line in f if line.strip()]


def _tail(path: str, lines: int = 15) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    text = f.read().replace("\r", "\n")
  return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def run_stage(
  stage: str,
  config: str,
  workdir: str,
  overrides: Sequence[str],
  log_dir: str,
  env: dict | None = None,
) -> StageRun:
  """Runs one stage in its own process; raises `UserError` with its log's tail on failure."""
  os.makedirs(log_dir, exist_ok=True)
  log = os.path.join(log_dir, f"{stage}.log")
  command = [
    sys.executable,
    "-m",
    "avg_jax",
    stage,
    "--config",
    config,
    "--workdir",
    workdir,
    *(f"--config.{o}" for o in overrides),
  ]
  offset = _metrics_size(workdir)
  with open(log, "w", encoding="utf-8") as out:
    out.write(" ".join(command) + "\n")
    out.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
  if proc.returncode != 0:
    raise UserError(
      f"stage {stage} failed (exit {proc.returncode}); the end of {log}:\n" + _tail(log)
    )
  # Linux reports ru_maxrss in KiB.
  return StageRun(
    stage,
    round(wall, 2),
    round(usage.ru_utime, 2),
    round(usage.ru_stime, 2),
    round(usage.ru_maxrss / 1024, 1),
    _records_after(workdir, offset),
    log,
  )


def _steady_rate(records: list[dict], stage: str) -> float | None:
  """Median `examples_per_s` of the logged steps after the first (which compiles) of the
  stage's own training loop."""
  rates = [
    r["examples_per_s"]
    for r in records
    if r.get("stage") == stage and "examples_per_s" in r and r.get("step", 0) > 1
  ]
  return statistics.median(rates) if rates else None


def throughput(run: StageRun, counts: dict[str, Any]) -> dict:
  """`{"unit", "rate", "basis"}` of a stage, read from its metrics records and `counts`
  (`images`: all prepared images)."""
  r = run.records
  if run.stage == "prepare":
    return {"unit": "images/s", "rate": counts["images"] / run.wall_s, "basis": "wall"}
  if run.stage == "embed":
    seconds = sum(x["seconds"] for x in r if x.get("stage") == "embed" and "seconds" in x)
    if seconds:
      return {
        "unit": "images/s",
        "rate": counts["images"] / seconds,
        "basis": "extraction seconds (images + their captions)",
      }
    return {"unit": "images/s", "rate": counts["images"] / run.wall_s, "basis": "wall"}
  if run.stage in ("tokenize", "train", "rank"):
    unit = "pairs/s" if run.stage == "tokenize" else "examples/s"
    rate = _steady_rate(r, run.stage)
    return {
      "unit": unit,
      "rate": rate,
      "basis": "median logged step after the first" if rate else "no steady step logged",
    }
  if run.stage == "evaluate":
    rates = [
      x["queries_per_s"]
      for x in r
      if x.get("method") == "avg" and x.get("split") == "test" and "queries_per_s" in x
    ]
    return {
      "unit": "queries/s",
      "rate": rates[0] if rates else None,
      "basis": "avg, test split, constrained beam search",
    }
  return {"unit": "", "rate": None, "basis": ""}
