"""The CLI's error convention: one line, exit 2, no traceback."""

import subprocess
import sys

from avg_jax import cli


def test_unknown_override_exits_2_with_one_line(repo_root, capsys):
  rc = cli.main(["prepare", "--config", str(repo_root / "configs/smoke.py:tiny"),
                 "--workdir", "unused", "--config.t5.nope=1"])
  assert rc == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["avg-jax: error: unknown config key: t5.nope"]


def test_override_with_separate_value(repo_root, capsys):
  rc = cli.main(["prepare", "--config", str(repo_root / "configs/smoke.py:tiny"),
                 "--workdir", "unused", "--config.data.num_train", "abc"])
  assert rc == 2
  assert "data.num_train: cannot parse 'abc' as int" in capsys.readouterr().err


def test_python_dash_m_entry_point(repo_root):
  proc = subprocess.run([sys.executable, "-m", "avg_jax", "--help"], capture_output=True,
                        text=True, cwd=repo_root, timeout=120)
  assert proc.returncode == 0
  for stage in cli.PIPELINE + ("run", "bench", "search"):
    assert stage in proc.stdout


def test_debug_shows_traceback(repo_root):
  proc = subprocess.run(
      [sys.executable, "-m", "avg_jax", "prepare", "--config", "configs/nope.py", "--workdir",
       "unused", "--debug"], capture_output=True, text=True, cwd=repo_root, timeout=120)
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  proc = subprocess.run(
      [sys.executable, "-m", "avg_jax", "prepare", "--config", "configs/nope.py", "--workdir",
       "unused"], capture_output=True, text=True, cwd=repo_root, timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip() == "avg-jax: error: config file not found: configs/nope.py"
