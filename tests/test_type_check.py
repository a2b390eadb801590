"""mypy over `avg_jax/` (config in pyproject.toml) as a test of the suite.

It runs inside the suite rather than before it: on a fresh clone (no `.mypy_cache`) mypy takes
~30 s of one core, which before pytest left the other core idle; as a test it overlaps the
other worker's tests (marked slow: tests/conftest.py hands it out early, never as a worker's
last test). `ruff check` and `ruff format --check` (under a second) still run before pytest in
launch/local.sh.
"""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_mypy_reports_no_errors(repo_root):
  result = subprocess.run(
    [sys.executable, "-m", "mypy"],
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stdout + result.stderr
  # It checked the package (pyproject.toml's `files`), not an empty selection.
  checked = re.search(r"no issues found in (\d+) source files", result.stdout)
  assert checked and int(checked.group(1)) >= 100, result.stdout
