"""benchmarks/ltr_variants.py: rank variants against their generator, the workdir untouched."""

import importlib.util
import json
import os

import pytest

from avg_jax.errors import UserError


def _script(repo_root):
  spec = importlib.util.spec_from_file_location(
      "ltr_variants", repo_root / "benchmarks" / "ltr_variants.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _tree(path):
  return sorted((os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
                for d, _, files in os.walk(path) for f in files)


def test_variants_are_measured_in_scratch_copies(repo_root, pipeline_workdir, tmp_path,
                                                 monkeypatch):
  monkeypatch.chdir(repo_root)
  script = _script(repo_root)
  before = _tree(pipeline_workdir / "rank")
  out = tmp_path / "ltr.json"
  assert script.main(["--workdir", str(pipeline_workdir), "--config", "configs/smoke.py:tiny",
                      "--out", str(out), "--variant", "w0=rank.rank_weight=0.0",
                      "--seeds", "0"]) == 0
  assert _tree(pipeline_workdir / "rank") == before
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["generator", "w0"]
  for split in ("val", "test"):
    assert 0 <= rows[1][split]["R@1"] <= rows[1][split]["R@5"] <= rows[1][split]["R@10"] <= 100
    d = rows[1][split]["vs_generator"]["R@1"]
    assert d["diff"] == pytest.approx(rows[1][split]["R@1"] - rows[0][split]["R@1"])
    assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]


def test_paired_difference_by_hand(repo_root):
  import numpy as np
  script = _script(repo_root)
  base = np.array([0, 3, 10, 1])           # ranks: hits at 1 for query 0 only
  variant = np.array([[1, 0, 10, 1], [0, 0, 10, 1]])
  # R@1 per query, seeds averaged: [0.5, 1, 0, 0] - [1, 0, 0, 0] -> mean +12.5 points.
  d = script.paired(variant, base, 1, np.random.default_rng(0))
  assert d["diff"] == pytest.approx(12.5)
  assert d["ci95"][0] <= 12.5 <= d["ci95"][1]


def test_errors(repo_root, tmp_path):
  script = _script(repo_root)
  with pytest.raises(UserError, match="expected name=override"):
    script.parse_variant("no-equals-sign")
  with pytest.raises(UserError, match="train stage has not finished"):
    script.main(["--workdir", str(tmp_path), "--config", str(repo_root / "configs/smoke.py:tiny"),
                 "--out", str(tmp_path / "o.json"), "--variant", "a="])
