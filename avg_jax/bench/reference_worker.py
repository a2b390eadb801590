"""The PyTorch reference side of a benchmark, in its own process, timed round by round.

A fair comparison gives the reference its best settings and the same machine state as ours:

  * its own process, started with `OMP_WAIT_POLICY=PASSIVE` (busy-waiting OpenMP threads slow
    it 4-9x on a loaded 2-core machine) and `torch.set_num_threads` = the CPUs this process
    may use (`os.sched_getaffinity`), not `os.cpu_count()`;
  * warm-up calls before timing, then rounds interleaved with ours by the caller, and the
    median of each side's rounds.

    worker = ReferenceWorker("avg_jax.bench.decode:reference_setup", payload_dir)
    worker.time("cached")          # one timed call in the worker -> seconds
    worker.call("top1")            # a call whose JSON result comes back
    worker.close()

`setup(payload_dir) -> {name: callable}` runs in the worker (it may import torch); each
`time(name)` runs `callable()` once and returns the worker's own wall time for it. The
worker imports `setup`'s module by name: give it as a string literal, which
tests/test_package_layout.py reads as the caller's import (and checks that it exists). The
library never imports torch: only benchmarks start a worker, and only when the reference
extra is installed (`available()`).
"""

import importlib
import json
import os
import subprocess
import sys
import time
from typing import Any

from avg_jax.errors import UserError


def available() -> bool:
  """Whether torch and transformers import (the `requirements-reference.txt` extra)."""
  try:
    import torch  # noqa: F401  (the reference side only)
    import transformers  # noqa: F401
  except ImportError:
    return False
  return True


def cpu_threads() -> int:
  """CPUs this process may run on (affinity), the reference's thread count."""
  if hasattr(os, "sched_getaffinity"):
    return max(1, len(os.sched_getaffinity(0)))
  return max(1, os.cpu_count() or 1)


class ReferenceWorker:
  """A worker process running `setup`'s callables on request (see the module docstring)."""

  def __init__(self, setup: str, payload_dir: str, timeout_s: float = 1800.0):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", JAX_PLATFORMS="cpu")
    code = (
      "import sys; from avg_jax.bench import reference_worker as w; "
      "w.serve(sys.argv[1], sys.argv[2])"
    )
    self.proc = subprocess.Popen(
      [sys.executable, "-c", code, setup, payload_dir],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      env=env,
    )
    assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPE
    self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
    self.timeout_s = timeout_s
    self.info = self._read()  # {"threads": n, "names": [...]} once set up

  def _read(self) -> Any:
    line = self._stdout.readline()
    if not line:
      raise UserError(f"reference worker exited with {self.proc.wait()} (see its stderr)")
    return json.loads(line)

  def _ask(self, op: str, name: str) -> Any:
    self._stdin.write(f"{op} {name}\n")
    self._stdin.flush()
    return self._read()

  def time(self, name: str) -> float:
    """Seconds of one call of `name`, measured inside the worker."""
    return float(self._ask("time", name))

  def call(self, name: str) -> Any:
    """The JSON-able result of one call of `name`."""
    return self._ask("call", name)

  def close(self) -> None:
    if self.proc.poll() is None:
      self._stdin.close()
      self.proc.wait(timeout=60)


def serve(setup: str, payload_dir: str) -> None:
  """The worker's main loop: set up, then answer `time NAME` / `call NAME` lines."""
  try:
    import torch

    torch.set_num_threads(cpu_threads())
    threads = torch.get_num_threads()
  except ImportError:  # a setup without torch (the worker's own tests)
    threads = cpu_threads()
  module_name, _, fn_name = setup.partition(":")
  fns = getattr(importlib.import_module(module_name), fn_name)(payload_dir)
  print(json.dumps({"threads": threads, "names": sorted(fns)}), flush=True)
  for line in sys.stdin:
    op, _, name = line.strip().partition(" ")
    if op == "time":
      start = time.perf_counter()
      fns[name]()
      print(json.dumps(time.perf_counter() - start), flush=True)
    elif op == "call":
      print(json.dumps(fns[name]()), flush=True)
