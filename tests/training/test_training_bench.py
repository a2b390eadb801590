"""`avg-jax bench train --quick` runs the real step on 1 and 8 devices and writes its file."""

import json
import os

import pytest

from avg_jax import cli


@pytest.mark.slow
def test_bench_train_quick(repo_root, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(repo_root)
  assert cli.main(["bench", "train", "--quick", "--workdir", str(tmp_path)]) == 0
  result = json.loads((tmp_path / "bench_train.json").read_text())
  assert [r["devices"] for r in result["rows"]] == [1, 8]
  assert result["xla_flags"] == os.environ["XLA_FLAGS"]  # the workers kept all but the count
  assert all(r["examples_per_s"] > 0 and r["model"] == "tiny" for r in result["rows"])
  assert "examples/s" in capsys.readouterr().out


def test_bench_train_accelerator_path_reports_flops_and_mfu(repo_root, tmp_path, monkeypatch):
  # --quick lets the accelerator path run on the CPU backend: one in-process bfloat16 run.
  monkeypatch.chdir(repo_root)
  assert (
    cli.main(
      [
        "bench",
        "train",
        "--quick",
        "--accelerator",
        "--peak-tflops",
        "0.1",
        "--workdir",
        str(tmp_path),
      ]
    )
    == 0
  )
  result = json.loads((tmp_path / "bench_train.json").read_text())
  (row,) = result["rows"]
  assert result["accelerator"] and row["dtype"] == "bfloat16" and row["backend"] == "cpu"
  assert row["flops_per_step"] > 0
  assert row["mfu"] == pytest.approx(row["achieved_tflops"] / (0.1 * row["devices"]))


def test_bench_train_accelerator_without_one_is_a_clear_error(
  repo_root, tmp_path, monkeypatch, capsys
):
  monkeypatch.chdir(repo_root)
  assert cli.main(["bench", "train", "--accelerator", "--workdir", str(tmp_path)]) == 2
  assert "no GPU/TPU backend is attached" in capsys.readouterr().err
