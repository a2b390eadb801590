"""One owner per workdir stage: `<workdir>/.locks/<stage>.lock`, held with `fcntl.flock`.

Two runs of one stage on one workdir would both write its folder and `metrics.jsonl` (the last
writer wins, the metrics mix both). The first run to take the lock owns the stage until it
returns; a second one stops at once with a one-line `UserError` naming the owner (pid, host,
start time, read from the lock file). The kernel drops a flock when its holder exits, however
it exits (kill -9 too), so a crashed owner never leaves the stage locked.

A job of several JAX processes is one owner: process 0 takes the lock and tells the others
whether it got it (a collective), so they all run or all stop. Nested holds of the same stage
in one process (evaluate runs the train stage) are counted, not locked twice. flock is
per host: on a workdir shared between hosts (NFS) it only guards what that file system
supports.
"""

import contextlib
import fcntl
import functools
import os
import socket
import time
from collections.abc import Callable, Iterator

from avg_jax import processes
from avg_jax.errors import UserError

LOCKS_DIR = ".locks"

# Lock path -> [open file descriptor (None outside process 0), nesting depth], this process.
_held: dict[str, list] = {}


def lock_file(workdir: str, stage: str) -> str:
  return os.path.join(workdir, LOCKS_DIR, f"{stage}.lock")


def _owner(path: str) -> str:
  """The owner line the holder wrote, for the error message."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read().strip()
  except OSError:
    text = ""
  return text or "another process (owner not recorded yet)"


def _acquire(path: str) -> int | None:
  """An fd holding `path`'s lock, or None when another process holds it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    return None
  # Ours now: record who we are for the next run's message (the lock, not this text, decides).
  since = time.strftime("%Y-%m-%d %H:%M:%S %z")
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode(), 0)
  return fd


@contextlib.contextmanager
def stage_lock(workdir: str, stage: str) -> Iterator[None]:
  """Owns `stage` of `workdir` for the block; `UserError` (exit 2) when another run does."""
  path = os.path.abspath(lock_file(workdir, stage))
  if path in _held:  # already ours (a stage run from within another stage)
    _held[path][1] += 1
    try:
      yield
    finally:
      _held[path][1] -= 1
    return
  fd, owner = None, ""
  if processes.is_main():
    fd = _acquire(path)
    if fd is None:
      owner = _owner(path)
  if not processes.process_0_succeeded(fd is not None or not processes.is_main()):
    if processes.is_main():
      raise UserError(
        f"workdir {workdir}: stage {stage} is being run by {owner}; wait for it "
        f"or use another workdir"
      )
    raise UserError(
      f"workdir {workdir}: stage {stage} is being run by another job (see process 0's error)"
    )
  _held[path] = [fd, 1]
  try:
    yield
  finally:
    del _held[path]
    if fd is not None:
      os.close(fd)  # releases the flock; the file stays (removing it would race a new owner)


def holding(stage: str) -> Callable:
  """Decorates `fn(config, workdir, ...)` to run under `stage_lock(workdir, stage)`."""

  def decorate(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(config, workdir, *args, **kwargs):
      with stage_lock(str(workdir), stage):
        return fn(config, workdir, *args, **kwargs)

    return wrapper

  return decorate
