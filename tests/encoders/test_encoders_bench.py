"""`avg-jax bench embed --quick` runs and writes its results file."""

import json
import types

import pytest

from avg_jax import config as config_lib
from avg_jax.bench import embed


@pytest.mark.slow
def test_bench_embed_quick(tmp_path, repo_root):
  config = config_lib.load_config(f"{repo_root}/configs/smoke.py:tiny")
  embed.run(config, str(tmp_path), types.SimpleNamespace(quick=True))
  with open(tmp_path / "bench_embed.json") as f:
    result = json.load(f)
  assert result["quick"] and result["machine"]["jax_version"]
  assert {"processor", "cpu_count", "date", "command"} <= set(result["machine"])
  assert [r["model"] for r in result["encoders"]] == ["config"]
  assert all(r["images_per_s"] > 0 and r["captions_per_s"] > 0 for r in result["encoders"])
  assert [r["num_items"] for r in result["retrieval"]] == [1000, 10000]
  assert all(r["queries_per_s"] > 0 for r in result["retrieval"])
