"""The reference side's worker process: its environment, its own timing, results back."""

import os

import pytest

from avg_jax.bench import reference_worker
from avg_jax.errors import UserError

SETUP = """
import json, os, time

def setup(folder):
  with open(os.path.join(folder, "x.json")) as f:
    x = json.load(f)
  return {"sleep": lambda: time.sleep(0.05),
          "env": lambda: [os.environ.get("OMP_WAIT_POLICY"), x],
          "fail": lambda: 1 / 0}
"""


def test_worker_times_in_its_own_process_with_passive_threads(tmp_path, monkeypatch):
  (tmp_path / "fake_setup.py").write_text(SETUP)
  (tmp_path / "x.json").write_text("7")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  worker = reference_worker.ReferenceWorker("fake_setup:setup", str(tmp_path))
  try:
    assert worker.info == {
      "threads": reference_worker.cpu_threads(),
      "names": ["env", "fail", "sleep"],
    }
    assert 0.05 <= worker.time("sleep") < 5
    assert worker.call("env") == ["PASSIVE", 7]
    worker.proc.stdin.write("time fail\n")
    worker.proc.stdin.flush()
    with pytest.raises(UserError, match="reference worker exited"):
      worker._read()
  finally:
    worker.close()


def test_cpu_threads_follow_the_affinity():
  if hasattr(os, "sched_getaffinity"):
    assert reference_worker.cpu_threads() == len(os.sched_getaffinity(0))
  assert reference_worker.cpu_threads() >= 1
