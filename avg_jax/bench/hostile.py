"""Hostile clients for `avg-jax bench serve --hostile N`: what a bad actor holding the write
token (or a broken client) sends while honest clients search.

Client i plays kind `KINDS[i % 4]`, back to back until the level ends:

    slow_body     a POST /v1/search whose 64 KiB body arrives 16 bytes every 0.2 s (never
                  completes; the connection is dropped when the level ends)
    pixel_bomb    an 8 000 x 8 000 grey PNG (64 M pixels in ~70 KB, over the default 40 M
                  budget): refused on its header
    decode_bomb   a 6 000 x 6 000 PNG cut short (36 M pixels, within the pixel budget): a
                  worker inflates ~100 MB before it finds the cut
    svg_bomb      an SVG whose nested entities expand 10^8-fold: expat works until its
                  amplification limit stops it

Every upload is refused (400), so the index never changes during the measurement: the honest
clients' latency shows the cost of the attacks alone, not of a re-compile. The hostile clients
run in a process of their own (`Attack`), so their work never delays the honest clients'
event loop in the measuring process (on a 2-CPU machine they still share the clients' CPU).
"""

import asyncio
import base64
import collections
import io
import json
import subprocess
import sys
import time

import aiohttp
from PIL import Image

KINDS = ("slow_body", "pixel_bomb", "decode_bomb", "svg_bomb")


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
  buffer = io.BytesIO()
  Image.new(mode, size).save(buffer, format="PNG", compress_level=9)
  return buffer.getvalue()


def payloads() -> dict[str, bytes]:
  """The JSON bodies of the upload kinds (made once: the PNGs take seconds to encode)."""
  entities = "".join(f'<!ENTITY e{i} "{f"&e{i - 1};" * 10 if i else "x" * 10}">' for i in range(8))
  svg = (
    f'<?xml version="1.0"?><!DOCTYPE svg [{entities}]>'
    f'<svg xmlns="http://www.w3.org/2000/svg"><text>&e7;</text></svg>'
  ).encode()
  decode_bomb = _png((6000, 6000))
  images = {"pixel_bomb": _png((8000, 8000)), "decode_bomb": decode_bomb[:-64], "svg_bomb": svg}
  return {
    kind: json.dumps({"images": [{"data": base64.b64encode(data).decode()}]}).encode()
    for kind, data in images.items()
  }


async def _slow_body(url: str, deadline: float, counts: collections.Counter) -> None:
  host, port = url.removeprefix("http://").rsplit(":", 1)
  while time.monotonic() < deadline:
    try:
      reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
      counts["slow_body connect error"] += 1
      await asyncio.sleep(0.1)
      continue
    writer.write(
      b"POST /v1/search HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
      b"\r\nContent-Length: 65536\r\n\r\n"
    )
    try:
      while time.monotonic() < deadline:
        writer.write(b" " * 16)
        await writer.drain()
        await asyncio.sleep(0.2)
    except OSError:
      counts["slow_body dropped by server"] += 1
    finally:
      writer.close()
    counts["slow_body sent"] += 1


async def _uploads(
  session: aiohttp.ClientSession,
  url: str,
  token: str,
  body: bytes,
  kind: str,
  deadline: float,
  counts: collections.Counter,
) -> None:
  headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
  while time.monotonic() < deadline:
    try:
      async with session.post(url + "/v1/images", data=body, headers=headers) as r:
        await r.read()
        counts[f"{kind} {r.status}"] += 1
    except (TimeoutError, aiohttp.ClientError) as e:
      counts[f"{kind} {type(e).__name__}"] += 1


async def run(
  url: str, token: str, clients: int, duration: float, bodies: dict[str, bytes]
) -> dict[str, int]:
  """`clients` hostile clients for `duration` seconds; -> {"<kind> <outcome>": count}."""
  counts: collections.Counter = collections.Counter()
  deadline = time.monotonic() + duration
  timeout = aiohttp.ClientTimeout(total=300)
  async with aiohttp.ClientSession(timeout=timeout) as session:
    tasks = []
    for i in range(clients):
      kind = KINDS[i % len(KINDS)]
      if kind == "slow_body":
        tasks.append(_slow_body(url, deadline, counts))
      else:
        tasks.append(_uploads(session, url, token, bodies[kind], kind, deadline, counts))
    await asyncio.gather(*tasks)
  return dict(sorted(counts.items()))


class Attack:
  """`run(...)` in a child process: started (payloads built) before the level, `go()` at its
  start, `result()` at its end (-> the outcome counts)."""

  def __init__(
    self, url: str, token: str, clients: int, duration: float, on_start=lambda pid: None
  ):
    code = (
      "import sys; from avg_jax.bench import hostile; "
      "hostile.child(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))"
    )
    self.proc = subprocess.Popen(
      [sys.executable, "-c", code, url, token, str(clients), str(duration)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    on_start(self.proc.pid)  # before the child starts its threads (bench serve pins it)
    assert self.proc.stdin is not None and self.proc.stdout is not None  # both PIPE
    self._stdin = self.proc.stdin
    if self.proc.stdout.readline().strip() != "READY":
      raise RuntimeError(f"bench serve: the hostile clients did not start ({self.proc.wait()})")

  def go(self) -> None:
    self._stdin.write("GO\n")
    self._stdin.flush()

  def result(self) -> dict[str, int]:
    out, _ = self.proc.communicate(timeout=600)
    lines = [line for line in out.splitlines() if line.startswith("OUTCOMES ")]
    if self.proc.returncode or not lines:
      raise RuntimeError(f"bench serve: the hostile clients failed ({self.proc.returncode})")
    return json.loads(lines[-1][len("OUTCOMES ") :])


def child(url: str, token: str, clients: int, duration: float) -> None:
  """The hostile clients' process: builds the payloads, says READY, waits for GO, attacks
  for `duration` seconds and prints `OUTCOMES {...}`."""
  bodies = payloads()
  print("READY", flush=True)
  sys.stdin.readline()
  outcomes = asyncio.run(run(url, token, clients, duration, bodies))
  print("OUTCOMES " + json.dumps(outcomes), flush=True)
