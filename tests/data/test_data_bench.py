"""`avg-jax bench data --quick` runs and writes its table as JSON."""

import json
import os
import pathlib

import pytest

from avg_jax import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_data_quick(prepared_workdir, monkeypatch, capsys):
  monkeypatch.chdir(REPO_ROOT)
  argv = [
    "bench",
    "data",
    "--config",
    "configs/smoke.py:tiny",
    "--workdir",
    prepared_workdir,
    "--quick",
  ]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "examples/s" in out and "decode + batch" in out
  with open(os.path.join(prepared_workdir, "bench_data.json")) as f:
    result = json.load(f)
  assert result["command"] == "avg-jax " + " ".join(argv)
  assert {"processor", "cpu_count", "jax", "date"} <= set(result["machine"])
  rows = result["results"]
  assert [(r["stage"], r["worker_count"]) for r in rows] == [
    ("read records + batch", 0),
    ("decode + batch", 0),
    ("decode + batch", 0),
    ("decode + batch", 2),
  ]
  for r in rows:
    assert r["examples"] == 4 * 64 and r["examples_per_s"] > 0
