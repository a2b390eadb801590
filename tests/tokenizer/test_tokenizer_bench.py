"""`avg-jax bench tokenize --quick` runs end to end and records what it measured."""

import json

from avg_jax import cli


def test_quick_bench_writes_results(tmp_path, repo_root, capsys):
  code = cli.main(
    [
      "bench",
      "tokenize",
      "--quick",
      "--config",
      str(repo_root / "configs" / "smoke.py") + ":tiny",
      "--workdir",
      str(tmp_path),
    ]
  )
  assert code == 0
  with open(tmp_path / "bench_tokenize.json") as f:
    record = json.load(f)
  result = record["result"]
  assert record["size"] == "quick" and record["speedup_vs_reference"] is None
  assert result["pairs"] == 10000 and result["timed_steps"] == 3
  assert result["train_pairs_per_s"] > 0 and result["assign_images_per_s"] > 0
  assert result["distinct_ids"] >= 1
  for key in ("processor", "cpu_count", "jax", "date", "command"):
    assert key in record["machine"]
  assert "train pairs/s" in capsys.readouterr().out
