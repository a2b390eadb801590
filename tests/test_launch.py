"""launch/local.sh's choice of interpreter for the venv (`create_venv`), with fake interpreters:
the first candidate that runs, is Python >= 3.11 and creates a venv wins; a failed try leaves
no partial folder behind, unless the folder was there before."""

import pathlib
import subprocess

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# A fake `python`: `-c ...` (the version check) exits with $VERSION_OK's status; `-m venv DIR`
# makes DIR/bin/python and records which fake ran, or, with $VENV_FAILS, leaves a partial
# DIR and fails (as a distribution's python without its venv package does).
FAKE = """#!/bin/sh
if [ "$1" = "-c" ]; then exit {version_status}; fi
mkdir -p "$3"
if [ {venv_fails} = 1 ]; then touch "$3/partial"; exit 1; fi
mkdir -p "$3/bin" && touch "$3/bin/python" && echo {name} > "$3/made_by"
"""


def _fake(folder: pathlib.Path, name: str, *, old: bool = False, venv_fails: bool = False) -> str:
  path = folder / name
  path.write_text(FAKE.format(version_status=int(old), venv_fails=int(venv_fails), name=name))
  path.chmod(0o755)
  return str(path)


def _create_venv(venv: pathlib.Path, candidates: list[str]) -> subprocess.CompletedProcess:
  """Runs launch/local.sh's `create_venv` alone with `candidates` instead of its own."""
  script = (REPO_ROOT / "launch" / "local.sh").read_text()
  start = script.index("create_venv() {")
  function = script[start : script.index("\n}\n", start) + 3]
  program = (
    "set -euo pipefail\n"
    + function
    + f"VENV={venv}\nPYTHON_CANDIDATES=({' '.join(candidates)})\nunset PYTHON\ncreate_venv\n"
  )
  return subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60)


def test_the_first_working_candidate_builds_the_venv(tmp_path):
  venv = tmp_path / "venv"
  candidates = [
    str(tmp_path / "missing-python"),
    _fake(tmp_path, "too-old", old=True),
    _fake(tmp_path, "no-venv-module", venv_fails=True),
    _fake(tmp_path, "good"),
    _fake(tmp_path, "also-good"),
  ]
  result = _create_venv(venv, candidates)
  assert result.returncode == 0, result.stderr
  assert (venv / "made_by").read_text().strip() == "good"
  assert not (venv / "partial").exists()  # the failed try's folder was removed first


def test_no_candidate_is_a_clear_error_and_an_existing_folder_is_kept(tmp_path):
  venv = tmp_path / "venv"
  venv.mkdir()
  (venv / "keep.txt").write_text("not ours to delete")
  result = _create_venv(venv, [_fake(tmp_path, "no-venv-module", venv_fails=True)])
  assert result.returncode == 2
  assert "need Python >= 3.11 with its venv module" in result.stderr
  assert (venv / "keep.txt").read_text() == "not ours to delete"
