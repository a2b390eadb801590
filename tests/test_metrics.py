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


def test_drop_after_removes_only_this_runs_later_steps(tmp_path):
  workdir = str(tmp_path)
  avg = MetricsWriter(workdir, "train", run={"scheme": "avg", "protocol": "transductive"})
  rq = MetricsWriter(workdir, "train", run={"scheme": "rq", "protocol": "transductive"})
  for step in (2, 4, 6):
    avg.write(step=step, loss=1.0 / step)
    rq.write(step=step, loss=2.0 / step)
  MetricsWriter(workdir, "rank").write(step=6, loss=0.1)  # another stage
  avg.write(split="val", method="avg")  # no step: not a training record
  assert avg.drop_after(2) == 2
  records = list(read_metrics(workdir))
  assert [(r["stage"], r.get("scheme"), r.get("step")) for r in records] == [
    ("train", "avg", 2),
    ("train", "rq", 2),
    ("train", "rq", 4),
    ("train", "rq", 6),
    ("rank", None, 6),
    ("train", "avg", None),
  ]
  assert records[0]["protocol"] == "transductive"
  assert avg.drop_after(2) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", "metrics.jsonl"]


def test_drop_after_only_in_process_zero(tmp_path):
  MetricsWriter(str(tmp_path), "train").write(step=5)
  assert MetricsWriter(str(tmp_path), "train", process_index=1).drop_after(1) == 0
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [5]
