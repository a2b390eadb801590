"""`avg-jax bench train --quick` runs the real step on 1 and 8 devices and writes its file."""

import json

from avg_jax import cli


def test_bench_train_quick(repo_root, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(repo_root)
  assert cli.main(["bench", "train", "--quick", "--workdir", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "bench_train.json").read_text())
  assert [r["devices"] for r in result["rows"]] == [1, 8]
  assert all(r["examples_per_s"] > 0 and r["model"] == "tiny" for r in result["rows"])
  assert "examples/s" in capsys.readouterr().out
