"""The shared metrics writer."""

import json

import numpy as np

from avg_jax.metrics import MetricsWriter, read_metrics


def test_records_are_appended_as_json_lines(tmp_path):
  w = MetricsWriter(str(tmp_path), "train")
  w.write(step=1, loss=np.float32(0.5))
  MetricsWriter(str(tmp_path), "evaluate").write(method="avg", **{"R@1": np.array(0.25)})
  records = list(read_metrics(str(tmp_path)))
  assert [r["stage"] for r in records] == ["train", "evaluate"]
  assert records[0]["step"] == 1 and records[0]["loss"] == 0.5
  assert records[1]["R@1"] == 0.25 and records[1]["method"] == "avg"
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert all(json.loads(line) for line in lines)


def test_non_finite_values_stay_visible(tmp_path):
  MetricsWriter(str(tmp_path), "train").write(loss=float("nan"))
  assert next(read_metrics(str(tmp_path)))["loss"] == "nan"


def test_only_process_zero_writes(tmp_path):
  MetricsWriter(str(tmp_path), "train", process_index=1).write(step=1)
  assert list(read_metrics(str(tmp_path))) == []
