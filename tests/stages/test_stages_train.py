"""`avg-jax train` in a subprocess: kill -9 then resume (in this process) gives the parameters of
an uninterrupted run (the shared pipeline's), SIGTERM saves a checkpoint and exits 143."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import one_device_env

from avg_jax import cli
from avg_jax import config as config_lib
from avg_jax.artifacts.checkpoints import Checkpointer
from avg_jax.metrics import read_metrics
from avg_jax.training import state as state_lib

# The tiny config's own step count: the uninterrupted run to compare with is then the shared
# pipeline's train stage (`pipeline_workdir`: the same config, devices and XLA flags), not a
# third run. Checkpoint, log and evaluation intervals do not change the parameters.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = int(config_lib.load_config(str(REPO_ROOT / "configs/smoke.py:tiny"), []).train.steps)
OVERRIDES = [
  "--config.train.checkpoint_every=4",
  "--config.train.eval_every=0",
  "--config.train.log_every=4",
  "--config.train.keep_checkpoints=10",
]


def _train_cmd(repo_root, workdir):
  return [
    sys.executable,
    "-m",
    "avg_jax",
    "train",
    "--config",
    str(repo_root / "configs/smoke.py:tiny"),
    "--workdir",
    str(workdir),
    *OVERRIDES,
  ]


def _copy(tiny_workdir, dest):
  shutil.copytree(tiny_workdir, dest)
  return dest


def _env():
  # The suite's XLA flags (tests/conftest.py: 8 devices, -O0), as the pipeline fixture's: the
  # optimisation level changes float rounding, so other flags would give other parameters.
  return dict(os.environ, JAX_PLATFORMS="cpu", AVG_JAX_NO_PROGRESS="1")


def _final_params(repo_root, workdir):
  config = config_lib.load_config(
    str(repo_root / "configs/smoke.py:tiny"), [o[len("--config.") :] for o in OVERRIDES]
  )
  gen, mesh, params, _ = state_lib.final_params(config, str(workdir), "avg")
  return jax.device_get(params)


def _checkpoint_dir(workdir):
  return workdir / "train" / "transductive" / "avg" / "checkpoints"


def _wait_for_checkpoint(proc, directory, min_step, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"train exited early with {proc.returncode}")
    if directory.exists() and any(
      p.isdigit() and int(p) >= min_step for p in os.listdir(directory)
    ):
      return
    time.sleep(0.2)
  raise AssertionError("no checkpoint appeared")


def test_kill_9_then_resume_gives_identical_parameters(
  repo_root, tiny_workdir, pipeline_workdir, tmp_path, capsys
):
  killed = _copy(tiny_workdir, tmp_path / "killed")
  proc = subprocess.Popen(
    _train_cmd(repo_root, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  _wait_for_checkpoint(proc, _checkpoint_dir(killed), 8)
  proc.kill()  # SIGKILL: no handler runs, a save may be half-written
  proc.wait()
  assert not (killed / "train" / "transductive" / "avg" / "params").exists()
  # The resume runs `avg-jax train`'s code in this process (the kill needs a process, the
  # resume does not): it has the settings, devices and XLA flags of the killed run and of
  # the pipeline fixture's train stage, whose compiled step it reuses (a subprocess would
  # import jax and compile it again).
  capsys.readouterr()
  assert cli.main(_train_cmd(repo_root, killed)[3:]) == 0
  assert "train [avg, transductive]: resumed from step " in capsys.readouterr().out
  a, b = _final_params(repo_root, pipeline_workdir), _final_params(repo_root, killed)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The steps redone after the kill are logged once: the records of an uninterrupted run.
  steps = [
    (r["scheme"], r["protocol"], r["step"])
    for r in read_metrics(str(killed))
    if r["stage"] == "train" and "loss" in r
  ]
  assert steps == [("avg", "transductive", s) for s in range(4, STEPS + 1, 4)]


def test_sigterm_saves_a_checkpoint_and_exits_143(repo_root, tiny_workdir, tmp_path):
  workdir = _copy(tiny_workdir, tmp_path / "w")
  # One CPU device: nothing here is compared with another run, and the signal, the save and
  # the exit do not depend on the device count (the kill -9 test checkpoints on 8 devices).
  # Its compiles and steps cost less than on the suite's 8 fake devices (measured: the
  # subprocess 21 -> 15.5 s of CPU).
  proc = subprocess.Popen(
    _train_cmd(repo_root, workdir),
    env=one_device_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  _wait_for_checkpoint(proc, _checkpoint_dir(workdir), 4)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=240)
  if proc.returncode == 0:
    pytest.fail("training finished before SIGTERM arrived (too few tiny train.steps)")
  assert proc.returncode == 143, err
  assert "preempted at step" in err and "rerun the same command to resume" in err
  step = int(err.split("preempted at step ")[1].split(";")[0])
  assert step in Checkpointer(str(_checkpoint_dir(workdir))).steps()
