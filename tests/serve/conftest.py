"""Fixtures for the service tests: `avg-jax serve` processes on free ports (the server picks
one: --port 0 and prints it) over a copy of the tiny pipeline's export (`serve_export`,
tests/conftest.py)."""

import json
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
from helpers import one_device_env

# Generous bounds so a busy machine never fails a test; they only stop a hung test.
START_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 300


class Server:
  """One `python -m avg_jax serve` process; `url` once it listens."""

  def __init__(
    self, repo_root: pathlib.Path, model: pathlib.Path, *args: str, env: dict | None = None
  ):
    # One CPU device, like a serving machine: the export was written by an 8-device run.
    self.model = model
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "avg_jax", "serve", "--model", str(model), "--port", "0", *args],
      cwd=repo_root,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=one_device_env(**(env or {})),
    )
    self.lines: list[str] = []
    self._lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    self.url = self._wait_listening()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def _wait_listening(self) -> str:
    while True:
      try:
        line = self._lines.get(timeout=START_TIMEOUT_S)
      except queue.Empty:
        self.proc.kill()
        raise AssertionError("server did not start:\n" + "".join(self.lines)) from None
      if line is None:
        raise AssertionError(f"server exited with {self.proc.wait()}:\n" + "".join(self.lines))
      self.lines.append(line)
      if line.startswith("serve: listening on "):
        return line.split()[-1]

  def output(self) -> str:
    """Everything the process printed so far (after it exited: everything)."""
    while True:
      try:
        line = self._lines.get_nowait()
      except queue.Empty:
        return "".join(self.lines)
      if line is not None:
        self.lines.append(line)

  def stop(self) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    try:
      return self.proc.wait(timeout=REQUEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise

  def request(
    self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
  ) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; 4xx/5xx are returned, not raised."""
    req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
    try:
      with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
        return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
      return e.code, dict(e.headers), e.read()

  def metrics_text(self) -> str:
    return self.request("GET", "/metrics")[2].decode()

  def search(self, queries, k=None, **extra) -> tuple[int, dict]:
    document = {"queries": queries, **({} if k is None else {"k": k}), **extra}
    status, _, body = self.request("POST", "/v1/search", json.dumps(document).encode())
    return status, json.loads(body)

  def metric(self, name: str) -> float:
    """The value of one unlabelled sample of /metrics."""
    _, _, body = self.request("GET", "/metrics")
    for line in body.decode().splitlines():
      if line.startswith(name + " "):
        return float(line.split()[1])
    raise AssertionError(f"no sample {name} in /metrics")


@pytest.fixture(scope="session")
def start_server(repo_root):
  """`start_server(model, *args, env=None) -> Server`; every server still running is stopped
  at the end."""
  servers = []

  def start(model, *args, env=None):
    servers.append(Server(repo_root, model, *args, env=env))
    return servers[-1]

  yield start
  for s in servers:
    if s.proc.poll() is None:
      s.stop()


@pytest.fixture(scope="session")
def server(start_server, serve_export) -> Server:
  """The shared server: k up to 6 (the tiny export's beam is 5: k 6 is a program of its
  own), 20 ms batching window."""
  return start_server(serve_export, "--max-k", "6", "--batch-wait-ms", "20")


@pytest.fixture(scope="session")
def retriever(serve_export):
  from avg_jax.inference.retriever import Retriever

  return Retriever.load(str(serve_export))


WRITE_TOKEN = "test-write-token-0123456789"
HANG_PREFIX = "HANG"  # an upload starting with these bytes hangs its decoder (image_worker)
# The writable server's decode budget (--image-timeout). Two tests wait it out, idle, on a
# hanging decoder. The uploads that must decode are tiny images (tens of pixels a side, about
# a millisecond of decoding), and a worker's start-up never counts against the budget
# (avg_jax/data/image_worker.py): 3 s leaves a wide margin even at the worker's nice 10 on a
# loaded machine.
IMAGE_TIMEOUT_S = 3


@pytest.fixture(scope="session")
def writable_server(start_server, serve_export, tmp_path_factory) -> Server:
  """A server that accepts writes with `WRITE_TOKEN` (`.token`), on its own copy of the
  export (`.model`); its image decoders hang on uploads starting with `HANG_PREFIX` and are
  stopped after `IMAGE_TIMEOUT_S` (`.image_timeout`)."""
  import shutil

  from avg_jax.data import image_worker

  root = tmp_path_factory.mktemp("writable")
  shutil.copytree(serve_export, root / "export")
  (root / "token").write_text(WRITE_TOKEN + "\n")
  server = start_server(
    root / "export",
    "--batch-wait-ms",
    "5",
    "--allow-writes",
    "--write-token-file",
    str(root / "token"),
    "--image-timeout",
    str(IMAGE_TIMEOUT_S),
    env={image_worker.HANG_ENV: HANG_PREFIX},
  )
  server.token = WRITE_TOKEN
  server.image_timeout = IMAGE_TIMEOUT_S
  return server
