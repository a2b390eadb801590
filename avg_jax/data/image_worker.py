"""Decoding untrusted images in worker processes, each with a time budget and a memory cap.

    pool = WorkerPool(2, memory_bytes=2 << 30)
    pixels = pool.run({"formats": ["PNG", "SVG"], "max_pixels": 40_000_000, "size": 64},
                      data, timeout=10.0)          # uint8 [64, 64, 3], or ImageProblem

A worker is a child process (`python -m avg_jax.data.image_worker`) that runs
`image_decode.worker_job` on one request at a time, read from its stdin, answered on its stdout. It
is a process, not a thread, so that a decoder that hangs (a slow SVG drawing, a parser bug)
can be killed: past `timeout` the worker is killed (SIGKILL) and the request answered with
"took longer than T s to decode (stopped)"; the next request starts a fresh worker. The
worker also runs under an address-space limit (`memory_bytes`: an allocation beyond it fails
there, not in the caller), at a lower CPU priority (nice 10: a server's searches go first),
ignores SIGINT (its parent decides when it stops) and dies with its parent (Linux
PR_SET_PDEATHSIG), so a hung decode never outlives the service.

A new worker writes one byte when its imports are done; that wait (seconds on a busy machine,
at nice 10) has its own generous bound (`STARTUP_TIMEOUT_S`) and never counts against a
request's time budget.

Wire format, both ways: 4-byte big-endian length + a JSON header, 8-byte length + a payload.
Request header: `image_decode.worker_job`'s params; payload: the encoded image. Answer header:
{"problem": reason} or {"shape": [...]} / {"none": true}; payload: the uint8 pixels.
"""

import atexit
import concurrent.futures
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from avg_jax.data.image_decode import ImageProblem

# Tests only: a request whose payload starts with these bytes makes the worker sleep for an
# hour, to stand for a decoder that never returns (set in the worker's environment).
HANG_ENV = "AVG_JAX_IMAGE_WORKER_HANG_ON"
DEFAULT_MEMORY_BYTES = 3 << 30
STARTUP_TIMEOUT_S = 300.0
_READY = b"R"
_CHUNK = 1 << 20


def _frame(header: dict, payload: bytes) -> bytes:
  head = json.dumps(header).encode()
  return struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload)) + payload


class Worker:
  """One worker process, used by one thread at a time (`WorkerPool` hands them out)."""

  def __init__(self, memory_bytes: int = DEFAULT_MEMORY_BYTES, env: dict | None = None):
    self.memory_bytes = int(memory_bytes)
    self.env = dict(env or {})
    self._proc: subprocess.Popen | None = None
    self._ready = False

  def start(self) -> None:
    if self._proc is not None and self._proc.poll() is None:
      return
    self._ready = False
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", **self.env)
    # cwd: an empty place, so nothing a decoder might resolve relative to it is ours.
    command = [sys.executable, "-m", "avg_jax.data.image_worker", str(self.memory_bytes)]
    # Started from one thread that lives as long as this process: the worker's "die with the
    # parent" signal fires when the *thread* that started it ends (Linux PR_SET_PDEATHSIG),
    # and the caller may be a short-lived pool thread (prepare's image checks).
    self._proc = (
      _spawner()
      .submit(
        subprocess.Popen,
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tempfile.gettempdir(),
        env=env,
      )
      .result()
    )
    os.set_blocking(self._fd(stdin=True), False)

  def kill(self) -> None:
    proc, self._proc = self._proc, None
    if proc is not None:
      proc.kill()
      proc.wait()
      for pipe in (proc.stdin, proc.stdout):
        try:
          if pipe is not None:
            pipe.close()
        except OSError:
          pass

  @property
  def pid(self) -> int | None:
    return self._proc.pid if self._proc is not None else None

  def run(self, params: dict, data: bytes, timeout: float) -> np.ndarray | None:
    """`image_decode.worker_job(params, data)` in the worker; `ImageProblem` with its reason, or
    "took longer than ..." when the worker had to be killed."""
    self.start()
    try:
      if not self._ready:
        if self._read(1, time.monotonic() + STARTUP_TIMEOUT_S) != _READY:
          raise EOFError
        self._ready = True
    except (TimeoutError, EOFError):
      code = self._proc.poll() if self._proc is not None else None
      self.kill()
      raise ImageProblem(f"the decoder did not start ({_ended(code)})") from None
    deadline = time.monotonic() + timeout
    try:
      self._write(_frame(params, bytes(data)), deadline)
      head_len = struct.unpack(">I", self._read(4, deadline))[0]
      header = json.loads(self._read(head_len, deadline))
      payload = self._read(struct.unpack(">Q", self._read(8, deadline))[0], deadline)
    except TimeoutError:
      self.kill()
      raise ImageProblem(f"took longer than {timeout:g} s to decode (stopped)") from None
    except (EOFError, BrokenPipeError, ConnectionResetError):
      code = self._proc.poll() if self._proc is not None else None
      self.kill()
      raise ImageProblem(f"the decoder failed ({_ended(code)})") from None
    if "problem" in header:
      raise ImageProblem(header["problem"])
    if header.get("none"):
      return None
    return np.frombuffer(payload, np.uint8).reshape(header["shape"])

  def _fd(self, stdin: bool) -> int:
    """The worker's stdin (or stdout) file descriptor; EOFError when it was killed."""
    proc = self._proc
    pipe = None if proc is None else proc.stdin if stdin else proc.stdout
    if pipe is None:
      raise EOFError
    return pipe.fileno()

  def _write(self, data: bytes, deadline: float) -> None:
    fd, view = self._fd(stdin=True), memoryview(data)
    while view:
      _wait(fd, deadline, write=True)
      try:
        view = view[os.write(fd, view[:_CHUNK]) :]
      except BlockingIOError:
        continue

  def _read(self, n: int, deadline: float) -> bytes:
    fd, chunks = self._fd(stdin=False), []
    while n:
      _wait(fd, deadline, write=False)
      chunk = os.read(fd, min(n, _CHUNK))
      if not chunk:
        raise EOFError
      chunks.append(chunk)
      n -= len(chunk)
    return b"".join(chunks)


def _wait(fd: int, deadline: float, write: bool) -> None:
  remaining = deadline - time.monotonic()
  if remaining <= 0:
    raise TimeoutError
  ready = (
    select.select([], [fd], [], remaining)[1]
    if write
    else select.select([fd], [], [], remaining)[0]
  )
  if not ready:
    raise TimeoutError


def _ended(code: int | None) -> str:
  if code is None:
    return "the worker stopped answering"
  if code < 0:
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else code
    return f"the worker was ended by {name}"
  return f"the worker exited with status {code}"


class WorkerPool:
  """`size` workers; `run` takes a free one (waiting for one when all are busy)."""

  def __init__(self, size: int, memory_bytes: int = DEFAULT_MEMORY_BYTES, env: dict | None = None):
    self.workers = [Worker(memory_bytes, env) for _ in range(max(1, int(size)))]
    self._free = list(self.workers)
    self._cond = threading.Condition()
    self._closed = False

  def start(self) -> None:
    """Starts every worker now (else each starts on its first request)."""
    for w in self.workers:
      w.start()

  def run(self, params: dict, data: bytes, timeout: float) -> np.ndarray | None:
    with self._cond:
      while not self._free and not self._closed:
        self._cond.wait()
      if self._closed:
        raise ImageProblem("the server is shutting down")
      worker = self._free.pop()
    try:
      return worker.run(params, data, timeout)
    finally:
      with self._cond:
        self._free.append(worker)
        self._cond.notify()

  def close(self) -> None:
    """Kills every worker (a request in flight gets "the decoder failed")."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    for w in self.workers:
      w.kill()


_SHARED: WorkerPool | None = None
_SHARED_LOCK = threading.Lock()
_SPAWNER: concurrent.futures.ThreadPoolExecutor | None = None


def _spawner() -> concurrent.futures.ThreadPoolExecutor:
  """The one thread that starts every worker (see `Worker.start`)."""
  global _SPAWNER
  with _SHARED_LOCK:
    if _SPAWNER is None:
      _SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="avg-jax-spawn")
    return _SPAWNER


def shared_pool() -> WorkerPool:
  """The process's pool for `prepare` / `index add` (one worker per CPU, up to 4), started
  on first use and killed at exit."""
  global _SHARED
  with _SHARED_LOCK:
    if _SHARED is None:
      _SHARED = WorkerPool(min(4, os.cpu_count() or 1))
      atexit.register(_SHARED.close)
    return _SHARED


# --- the worker process --------------------------------------------------------------------


def _limit_self(memory_bytes: int) -> None:
  import resource

  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:  # die with the parent, even when it is killed (Linux)
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  if os.getppid() == 1:  # the parent died before prctl took effect
    sys.exit(0)
  try:
    os.nice(10)
  except OSError:
    pass
  if memory_bytes > 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


def _read_exactly(stream, n: int) -> bytes:
  data = stream.read(n)
  if len(data) != n:
    raise EOFError
  return data


def main(argv: list[str]) -> int:
  _limit_self(int(argv[0]) if argv else DEFAULT_MEMORY_BYTES)
  import resvg_py  # noqa: F401 - loaded now, not on the first SVG

  from avg_jax.data import image_decode

  hang_on = os.environ.get(HANG_ENV, "").encode()
  stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
  stdout.write(_READY)
  stdout.flush()
  while True:
    try:
      head_len = struct.unpack(">I", _read_exactly(stdin, 4))[0]
      params = json.loads(_read_exactly(stdin, head_len))
      data = _read_exactly(stdin, struct.unpack(">Q", _read_exactly(stdin, 8))[0])
    except EOFError:
      return 0
    if hang_on and data.startswith(hang_on):
      time.sleep(3600)
    try:
      pixels = image_decode.worker_job(params, data)
    except ImageProblem as e:
      answer = _frame({"problem": str(e)}, b"")
    except MemoryError:
      answer = _frame({"problem": "too large (the decoder ran out of memory)"}, b"")
    except Exception as e:  # noqa: BLE001 - any decoder failure is the image's problem
      answer = _frame({"problem": f"cannot decode ({type(e).__name__}: {e})"}, b"")
    else:
      answer = (
        _frame({"none": True}, b"")
        if pixels is None
        else _frame({"shape": list(pixels.shape)}, np.ascontiguousarray(pixels).tobytes())
      )
    stdout.write(answer)
    stdout.flush()


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
