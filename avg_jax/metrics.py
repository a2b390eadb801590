"""The one metrics writer every stage uses: `<workdir>/metrics.jsonl`, one JSON object a line.

Field names shared across stages: `stage`, `step` (training), `method` (evaluation: `two_tower`,
`avg`, `avg_ltr`, `rq`, `hkmeans`, `atomic`), `split`, and metric names such as `R@1`, `R@5`,
`R@10`, `queries_per_s`, `loss`, `learning_rate`, `grad_norm`, `examples_per_s`.
"""

import json
import math
import os
import time
from typing import Any, Iterator

import numpy as np

METRICS_FILE = "metrics.jsonl"


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


class MetricsWriter:
  """Appends metric records to `<workdir>/metrics.jsonl`; only process 0 writes."""

  def __init__(self, workdir: str, stage: str, *, process_index: int = 0):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.stage = stage
    self._enabled = process_index == 0
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)

  def write(self, **fields: Any) -> dict:
    """Writes one record `{"stage": ..., "time": ..., **fields}` and returns it."""
    record = {"stage": self.stage, "time": round(time.time(), 3), **_plain(fields)}
    if self._enabled:
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
    return record


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
