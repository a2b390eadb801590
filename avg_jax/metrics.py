"""The one metrics writer every stage uses: `<workdir>/metrics.jsonl`, one JSON object a line.

Field names shared across stages: `stage`, `step` (training), `method` (evaluation: `two_tower`,
`avg`, `avg_ltr`, `rq`, `hkmeans`, `atomic`), `split`, and metric names such as `R@1`, `R@5`,
`R@10`, `queries_per_s`, `loss`, `learning_rate`, `grad_norm`, `examples_per_s`.

A training run's records carry the fields that tell it from other runs of its stage (`run`:
e.g. the train stage's `scheme` and `protocol`). When it resumes from a checkpoint at step N it
calls `drop_after(N)`: its records past N (written before a crash, about to be redone) are
removed, so the file holds each (run, step) once and readers need not de-duplicate.
"""

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from avg_jax.artifacts import io

METRICS_FILE = "metrics.jsonl"
# What a printed table shows where a metric does not apply (hkmeans has no reconstruction
# error) or was not measured: a dash, never `nan` (which reads as a failed computation).
NOT_APPLICABLE = "–"  # an en dash


def format_metric(value: Any, spec: str = "") -> str:
  """`value` formatted with `spec` (e.g. ".4f"), or NOT_APPLICABLE for None or NaN."""
  if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
    return NOT_APPLICABLE
  return format(value, spec)


def _plain(value: Any) -> Any:
  """Converts numpy/jax scalars and arrays to JSON-serialisable Python values."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "tolist"):  # numpy and jax arrays / scalars
    return _plain(np.asarray(value).tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible rather than crash
  return value


@contextlib.contextmanager
def _file_lock(workdir: str) -> Iterator[None]:
  """Excludes other writers of `metrics.jsonl` (stages of other runs on this workdir) while
  appending or rewriting: an append into a file being replaced would be lost."""
  directory = os.path.join(workdir, ".locks")
  os.makedirs(directory, exist_ok=True)
  fd = os.open(os.path.join(directory, "metrics.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


class MetricsWriter:
  """Appends metric records to `<workdir>/metrics.jsonl`; only process 0 writes. `run`:
  fields added to every record that identify this run among its stage's (see `drop_after`)."""

  def __init__(
    self, workdir: str, stage: str, *, process_index: int = 0, run: Mapping[str, Any] | None = None
  ):
    self.workdir = workdir
    self.path = os.path.join(workdir, METRICS_FILE)
    self.stage = stage
    self.run = dict(run or {})
    self._enabled = process_index == 0
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, **fields: Any) -> dict:
    """Writes one record `{"stage": ..., "time": ..., **run, **fields}` and returns it."""
    record = {
      "stage": self.stage,
      "time": round(time.time(), 3),
      **_plain(self.run),
      **_plain(fields),
    }
    if self._enabled:
      with _file_lock(self.workdir), open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
    return record

  def _mine(self, record: dict) -> bool:
    return record.get("stage") == self.stage and all(
      record.get(k) == v for k, v in _plain(self.run).items()
    )

  def drop_after(self, step: int) -> int:
    """Removes this run's records whose `step` is past `step` (the run resumes there and
    writes them again), rewriting the file atomically; -> how many were removed."""
    if not self._enabled or not os.path.exists(self.path):
      return 0
    with _file_lock(self.workdir):
      with open(self.path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
      kept = []
      for line in lines:
        try:
          record = json.loads(line)
        except ValueError:
          kept.append(line)  # not ours to judge: keep what we cannot read
          continue
        stale = (
          isinstance(record, dict)
          and self._mine(record)
          and isinstance(record.get("step"), int)
          and record["step"] > step
        )
        if not stale:
          kept.append(line if line.endswith("\n") else line + "\n")
      removed = len(lines) - len(kept)
      if removed:
        io.write_text(self.path, "".join(kept))
    return removed


def read_metrics(workdir: str) -> Iterator[dict]:
  """Yields every record of `<workdir>/metrics.jsonl` (nothing when the file is absent)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if line:
        yield json.loads(line)
