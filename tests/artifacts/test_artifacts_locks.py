"""One owner per workdir stage: a second run stops with the owner named (exit 2), a killed
owner leaves nothing stuck, nested holds in one process are fine."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from avg_jax import cli
from avg_jax.artifacts import locks, paths
from avg_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOLDER = """
import sys, time
from avg_jax.artifacts import locks
with locks.stage_lock(sys.argv[1], sys.argv[2]):
  print("held", flush=True)
  time.sleep(300)
"""


def _env():
  return dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    AVG_JAX_NO_PROGRESS="1",
  )


def _hold(workdir, stage):
  """A separate process that owns `stage` of `workdir` until killed."""
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir), stage],
    env=_env(),
    stdout=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "held"
  return proc


def test_second_run_stops_then_runs_once_the_owner_is_killed(repo_root, tmp_path, capsys):
  workdir = tmp_path / "w"
  holder = _hold(workdir, "prepare")
  try:
    argv = [
      "prepare",
      "--config",
      str(repo_root / "configs/smoke.py:tiny"),
      "--workdir",
      str(workdir),
    ]
    # The second run in this process (a pid other than the holder's, so the flock conflict
    # is real): `python -m avg_jax` exits with cli.main's status (avg_jax/__main__.py) and
    # shows the same stderr, without a subprocess's ~6 s of imports.
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
      f"avg-jax: error: workdir {workdir}: stage prepare is being run by pid {holder.pid} "
      f"on host {socket.gethostname()} since "
      + err.split(" since ")[1].split(";")[0]
      + "; wait for it or use another workdir"
    ]
    assert not os.path.exists(paths.prepared_dir(workdir))
  finally:
    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock
    holder.wait()
  capsys.readouterr()
  assert cli.main(argv) == 0
  assert os.path.exists(paths.dataset_info_file(workdir))


def test_other_stages_and_workdirs_are_not_blocked(tmp_path):
  holder = _hold(tmp_path / "a", "train")
  try:
    with locks.stage_lock(str(tmp_path / "a"), "rank"):
      pass
    with locks.stage_lock(str(tmp_path / "b"), "train"):
      pass
    with pytest.raises(UserError, match=r"stage train is being run by pid \d+ on host"):
      with locks.stage_lock(str(tmp_path / "a"), "train"):
        pass
  finally:
    holder.kill()
    holder.wait()


def test_nested_holds_and_release_after_an_error(tmp_path):
  workdir = str(tmp_path / "w")
  with locks.stage_lock(workdir, "train"):
    with locks.stage_lock(workdir, "train"):  # evaluate running the train stage
      pass
    assert locks._held  # still held by the outer block
  with pytest.raises(RuntimeError):
    with locks.stage_lock(workdir, "train"):
      raise RuntimeError("stage failed")
  assert not locks._held
  # Released: another process can take it now.
  code = (
    "import sys; from avg_jax.artifacts import locks\n"
    "with locks.stage_lock(sys.argv[1], 'train'): print('ok')"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, workdir], env=_env(), capture_output=True, text=True, timeout=120
  )
  assert out.stdout.strip() == "ok", out.stderr
