"""The CLI's error convention: one line, exit 2, no traceback."""

import subprocess
import sys

import pytest

from avg_jax import cli
from avg_jax.errors import UserError
from avg_jax.stages import PIPELINE


def test_unknown_override_exits_2_with_one_line(repo_root, capsys):
  rc = cli.main(
    [
      "prepare",
      "--config",
      str(repo_root / "configs/smoke.py:tiny"),
      "--workdir",
      "unused",
      "--config.t5.nope=1",
    ]
  )
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["avg-jax: error: unknown config key: t5.nope"]


def test_override_with_separate_value(repo_root, capsys):
  rc = cli.main(
    [
      "prepare",
      "--config",
      str(repo_root / "configs/smoke.py:tiny"),
      "--workdir",
      "unused",
      "--config.data.num_train",
      "abc",
    ]
  )
  assert rc == 2
  assert "data.num_train: cannot parse 'abc' as int" in capsys.readouterr().err


def test_python_dash_m_entry_point(repo_root):
  proc = subprocess.run(
    [sys.executable, "-m", "avg_jax", "--help"],
    capture_output=True,
    text=True,
    cwd=repo_root,
    timeout=120,
  )
  assert proc.returncode == 0
  for stage in cli.PIPELINE + ("run", "bench", "search"):
    assert stage in proc.stdout


def test_debug_shows_traceback(repo_root):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "avg_jax",
      "prepare",
      "--config",
      "configs/nope.py",
      "--workdir",
      "unused",
      "--debug",
    ],
    capture_output=True,
    text=True,
    cwd=repo_root,
    timeout=120,
  )
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "avg_jax",
      "prepare",
      "--config",
      "configs/nope.py",
      "--workdir",
      "unused",
    ],
    capture_output=True,
    text=True,
    cwd=repo_root,
    timeout=120,
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip() == "avg-jax: error: config file not found: configs/nope.py"


def test_disk_full_in_any_stage_is_one_line(repo_root, tmp_path, capsys, monkeypatch):
  # Plain OSError (numpy, open) and a wrapper that kept only the message (orbax/tensorstore).
  import errno

  from avg_jax.stages import prepare

  target = str(tmp_path / "w" / "x.npz")
  args = [
    "prepare",
    "--config",
    str(repo_root / "configs/smoke.py:tiny"),
    "--workdir",
    str(tmp_path / "w"),
  ]
  for error, line in [
    (OSError(errno.ENOSPC, "No space left on device", target), f": {target}"),
    (ValueError("Error writing local file: [OS error 28: No space left on device]"), ""),
  ]:

    def fail(*_, error=error):
      raise error

    monkeypatch.setattr(prepare, "run", fail)
    assert cli.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
      f"avg-jax: error: no space left on device{line}; free space and rerun"
    ]
  monkeypatch.setattr(prepare, "run", lambda *_: (_ for _ in ()).throw(ValueError("other")))
  with pytest.raises(ValueError, match="other"):
    cli.main(args)


def test_every_stage_name_has_its_module():
  # Spelled out one by one (each stage process imports only its own): a slip names another.
  for name in PIPELINE:
    assert cli.stage_module(name).__name__ == f"avg_jax.stages.{name}"
  assert list(cli.stage_modules()) == list(PIPELINE)
  with pytest.raises(ValueError, match="unknown stage 'nope'"):
    cli.stage_module("nope")


def test_every_benchmark_name_has_its_module():
  for name in cli.BENCHES:
    assert cli.bench_module(name).__name__ == f"avg_jax.bench.{name}"
  with pytest.raises(UserError, match="unknown benchmark 'nope'"):
    cli.bench_module("nope")
