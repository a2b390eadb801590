"""`avg-jax bench t5 --quick` runs and writes its results file (reference side disabled)."""

import argparse
import json

import pytest

from avg_jax.bench import t5 as bench_t5
from avg_jax.config import load_config


@pytest.mark.slow
def test_quick_bench_without_reference(tmp_path, monkeypatch, repo_root, capsys):
  # The no-torch path: what a machine without the `reference` extra sees.
  monkeypatch.setattr(bench_t5, "_reference_available", lambda: "ImportError: no torch")
  config = load_config(str(repo_root / "configs" / "smoke.py") + ":tiny")
  data = bench_t5.run(config, str(tmp_path), argparse.Namespace(quick=True))
  out = capsys.readouterr().out
  assert "not run: ImportError: no torch" in out
  assert "train tokens/s" in out and "decode steps/s" in out
  saved = json.loads((tmp_path / "bench_t5.json").read_text())
  assert saved == json.loads(json.dumps(data))
  assert not saved["reference_available"]
  for key in ("processor", "cpu_count", "jax", "date", "command"):
    assert saved["machine"][key], key
  (result,) = saved["results"]
  assert result["size"]["name"] == "tiny"
  assert result["train"]["ours"]["tokens_per_s"] > 0
  assert result["decode"]["ours"]["steps_per_s"] > 0
  assert result["decode"]["ours_voken_logits_only"]["steps_per_s"] > 0
  assert result["train"]["reference"] is None and result["train"]["ratio_tokens_per_s"] is None
