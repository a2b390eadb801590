"""`avg-jax bench serve`: N concurrent clients against an `avg-jax serve` process.

    avg-jax bench serve --model EXPORT [--clients 1,8,64] [--duration 60] [--workdir W]

Starts the server on a free loopback port, then for each client count runs that many
keep-alive clients, each sending one-query `POST /v1/search` requests back to back for
`--duration` seconds (queries: the export's captions, in turn). Per level: requests,
errors, throughput, p50/p95/p99 latency, and from the server's /metrics the batch-size
histogram and the XLA compiles after warm-up. Then it stops the server (SIGTERM, checked to
exit 0), loads the same export in this process and measures `Retriever.search` throughput at
the server's mean batch size of each level, for the same duration: the service's overhead
is 1 - served / in-process throughput. Writes `<workdir>/bench_serve.json`.

The clients run in this process, on the same machine as the server. So that they do not take
CPU from it, the CPUs this process may use are split (when there are at least 2): the server
gets the first half, the clients the rest, and the in-process measurement runs in its own
process on the server's half -- both sides of the comparison get the same CPUs.
`--quick`: 1 and 4 clients for 2 s each (tests).

`--hostile N`: the server accepts writes (a bearer token written to the workdir), and each
level is run twice: honest clients alone, then the same with N hostile clients mixed in
(avg_jax/bench/hostile.py: slow bodies, pixel and decode bombs, an SVG entity bomb; every
upload refused, so the index never changes), run from a process of their own on the clients'
CPUs. The honest clients' rows side by side show what
the attacks cost them; the hostile clients' outcomes are counted per kind and status.
"""

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from avg_jax.artifacts import io, paths
from avg_jax.bench import common
from avg_jax.bench import hostile as hostile_lib
from avg_jax.errors import UserError
from avg_jax.inference import gallery as gallery_lib
from avg_jax.inference.retriever import Retriever

START_TIMEOUT_S = 900
FALLBACK_QUERIES = (
  "a red circle",
  "a small blue square at the top",
  "two shapes",
  "a green cross to the left of a yellow diamond",
  "a white triangle",
)


def _parse_clients(text: str) -> list[int]:
  try:
    clients = [int(c) for c in text.split(",") if c.strip()]
  except ValueError as e:
    raise UserError(f"bench serve --clients: expected integers like 1,8,64, got {text!r}") from e
  if not clients or min(clients) < 1:
    raise UserError(f"bench serve --clients: expected positive integers, got {text!r}")
  return clients


def cpu_split() -> tuple[set, set]:
  """(server CPUs, client CPUs): halves of this process's CPUs, or all for both on one."""
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  if len(cpus) < 2:
    return set(cpus), set(cpus)
  half = len(cpus) // 2
  return set(cpus[:half]), set(cpus[half:])


def pin(pid: int, cpus: set) -> None:
  """Pins the (just started) process `pid` to `cpus` (nothing when unknown).

  Done from this side after the start, not in a `preexec_fn`: this process runs JAX's threads,
  and Python code between fork and exec in a threaded parent can deadlock (JAX warns about it
  at every such start). The child is still importing Python then; the threads it starts later
  inherit the mask."""
  if cpus and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(pid, cpus)


class ServerProcess:
  """One `avg-jax serve --model M --port 0` process (pinned to `cpus` when given); `url` once
  it listens, `stop()` sends SIGTERM and returns its exit status."""

  def __init__(self, model: str, cpus: set | None = None, extra_args: tuple = ()):
    self.proc = subprocess.Popen(
      [sys.executable, "-m", "avg_jax", "serve", "--model", model, "--port", "0", *extra_args],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    pin(self.proc.pid, cpus or set())
    self.log: list[str] = []
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
      try:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
      except queue.Empty:
        self.proc.kill()
        raise UserError(
          "bench serve: the server did not start in time:\n" + "".join(self.log)
        ) from None
      if line is None:
        raise UserError("bench serve: the server exited:\n" + "".join(self.log[-20:]))
      if line.startswith("serve: listening on "):
        self.url = line.split()[-1]
        return

  def _pump(self, lines: queue.Queue) -> None:
    assert self.proc.stdout is not None  # stdout=PIPE
    for line in self.proc.stdout:
      self.log.append(line)
      lines.put(line)
    lines.put(None)

  def metrics(self) -> dict:
    with urllib.request.urlopen(self.url + "/metrics", timeout=60) as r:
      text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
      for s in family.samples:
        key = s.name + "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()))
        samples[key] = s.value
    return samples

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(timeout=300)


def _batch_histogram(before: dict, after: dict) -> dict[int, int]:
  """{queries per device call: calls} between two /metrics scrapes."""
  prefix = "avg_jax_serve_batch_size_bucket|le="
  cumulative = []
  for key, value in after.items():
    if key.startswith(prefix) and not key.endswith("+Inf"):
      cumulative.append((float(key[len(prefix) :]), value - before.get(key, 0.0)))
  cumulative.sort()
  hist, previous = {}, 0.0
  for le, count in cumulative:
    if count - previous:
      hist[int(le)] = int(count - previous)
    previous = count
  return hist


async def _level(url: str, clients: int, duration: float, queries: list[str], k: int) -> dict:
  latencies, errors, counter = [], [], [0]
  deadline = time.monotonic() + duration

  async def client(session: aiohttp.ClientSession, offset: int) -> None:
    i = offset
    while time.monotonic() < deadline:
      body = {"queries": [queries[i % len(queries)]], "k": k}
      i += clients
      start = time.perf_counter()
      try:
        async with session.post(url + "/v1/search", json=body) as r:
          await r.read()
          status = r.status
      except (TimeoutError, aiohttp.ClientError) as e:
        errors.append(type(e).__name__)
        continue
      latencies.append(time.perf_counter() - start)
      counter[0] += 1
      if status != 200:
        errors.append(str(status))

  connector = aiohttp.TCPConnector(limit=clients)
  timeout = aiohttp.ClientTimeout(total=300)
  start = time.perf_counter()
  async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
    await asyncio.gather(*(client(session, c) for c in range(clients)))
  wall = time.perf_counter() - start
  ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
  return {
    "clients": clients,
    "seconds": round(wall, 3),
    "requests": counter[0],
    "errors": len(errors),
    "error_kinds": sorted(set(errors)),
    "throughput_qps": round(counter[0] / wall, 2),
    "p50_ms": round(float(np.percentile(ms, 50)), 2),
    "p95_ms": round(float(np.percentile(ms, 95)), 2),
    "p99_ms": round(float(np.percentile(ms, 99)), 2),
  }


def in_process_main(model: str, batches: list[int], k: int, duration: float) -> None:
  """Entry of the in-process measurement's own process: prints `{batch: [q/s, ms/call]}`."""
  retriever = Retriever.load(model)
  queries = _queries(model)
  # The server answers every k <= beam with one program of k = min(beam, N): time that one.
  program_k = max(k, min(retriever.beam_size, len(retriever.image_ids)))
  out = {b: _in_process(retriever, b, program_k, duration, queries) for b in batches}
  print("IN_PROCESS " + json.dumps(out), flush=True)


def _in_process_subprocess(
  model: str, batches: list[int], k: int, duration: float, cpus: set
) -> dict[int, tuple[float, float]]:
  code = (
    "import sys; from avg_jax.bench import serve; "
    "serve.in_process_main(sys.argv[1], [int(b) for b in sys.argv[2].split(',')], "
    "int(sys.argv[3]), float(sys.argv[4]))"
  )
  proc = subprocess.Popen(
    [sys.executable, "-c", code, model, ",".join(map(str, batches)), str(k), str(duration)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  pin(proc.pid, cpus)
  try:
    stdout, stderr = proc.communicate(timeout=START_TIMEOUT_S + 10 * duration)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    raise
  lines = [line for line in stdout.splitlines() if line.startswith("IN_PROCESS ")]
  if proc.returncode or not lines:
    raise UserError("bench serve: the in-process measurement failed:\n" + stderr[-2000:])
  return {int(b): tuple(v) for b, v in json.loads(lines[-1][len("IN_PROCESS ") :]).items()}


def _in_process(
  retriever: Retriever, batch: int, k: int, duration: float, queries: list[str]
) -> tuple[float, float]:
  """(queries/s, ms per call) of back-to-back `Retriever.search` calls of `batch` queries."""
  texts = [queries[i % len(queries)] for i in range(batch)]
  retriever.search(texts, k=k)  # compile outside the timing
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < duration:
    retriever.search(texts, k=k)
    calls += 1
  seconds = time.perf_counter() - start
  return calls * batch / seconds, 1000 * seconds / calls


def _queries(model: str) -> list[str]:
  gallery = gallery_lib.read(model)
  if gallery is None:
    return list(FALLBACK_QUERIES)
  with open(os.path.join(model, gallery_lib.DIRECTORY, gallery_lib.INDEX), encoding="utf-8") as f:
    captions = [c for image in json.load(f)["images"] for c in image["captions"]]
  return captions or list(FALLBACK_QUERIES)


def _measure(server: ServerProcess, clients_run) -> dict:
  """One level: `clients_run()` is the coroutine of its clients, returning the honest
  clients' `_level` result; with the server's view of the level from /metrics."""
  load_before = os.getloadavg()[0]
  before = server.metrics()
  result = asyncio.run(clients_run())
  after = server.metrics()
  hist = _batch_histogram(before, after)
  calls = sum(hist.values())
  device_s = after["avg_jax_serve_device_seconds_sum"] - before.get(
    "avg_jax_serve_device_seconds_sum", 0.0
  )
  result.update(
    # Share of the wall time the device thread spent in search calls, and their mean
    # length: 1 - busy is the batching/scheduling idle time; a longer call than
    # in-process at the same batch is CPU contention (HTTP work, the clients).
    device_busy=round(device_s / result["seconds"], 4),
    device_ms_per_call=round(1000 * device_s / calls, 3) if calls else 0.0,
    batch_histogram=hist,
    mean_batch=round(sum(b * c for b, c in hist.items()) / calls, 2) if calls else 0.0,
    compiles_after_warmup=int(after["avg_jax_serve_xla_compiles_after_warmup_total"]),
    load_average_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
  )
  return result


def _with_hostile(
  server: ServerProcess,
  clients: int,
  duration: float,
  queries: list[str],
  k: int,
  hostile: int,
  token: str,
  cpus: set,
) -> dict:
  """One level of honest clients while `hostile` hostile ones (their own process, on the
  clients' CPUs) attack; the outcomes of theirs in "hostile_outcomes"."""
  attack = hostile_lib.Attack(
    server.url, token, hostile, duration, on_start=lambda pid: pin(pid, cpus)
  )

  async def level():
    attack.go()
    return await _level(server.url, clients, duration, queries, k)

  result = _measure(server, level)
  result.update(hostile=hostile, hostile_outcomes=attack.result())
  return result


def run(config, workdir: str, args) -> dict:
  model = args.model or paths.export_dir(workdir)
  clients = [1, 4] if args.quick else _parse_clients(args.clients)
  duration = min(args.duration, 2.0) if args.quick else float(args.duration)
  if duration <= 0:
    raise UserError(f"bench serve --duration: must be > 0, got {duration}")
  hostile = int(getattr(args, "hostile", 0) or 0)
  if hostile < 0:
    raise UserError(f"bench serve --hostile: must be >= 0, got {hostile}")
  queries = _queries(model)
  server_cpus, client_cpus = cpu_split()
  extra: tuple[str, ...] = ()
  token = ""
  if hostile:
    import secrets

    os.makedirs(workdir, exist_ok=True)
    token = secrets.token_urlsafe(24)
    token_file = os.path.join(workdir, "bench_serve_write_token")
    io.write_text(token_file, token + "\n")
    extra = ("--allow-writes", "--write-token-file", token_file)
  server = ServerProcess(model, server_cpus, extra)
  own_cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
  if client_cpus and own_cpus is not None:
    os.sched_setaffinity(0, client_cpus)
  try:
    info = json.loads(urllib.request.urlopen(server.url + "/v1/info", timeout=60).read())
    k = int(info["default_k"])
    levels = []
    for n in clients:
      results = [_measure(server, lambda n=n: _level(server.url, n, duration, queries, k))]
      _print_level(results[-1])
      if hostile:
        results.append(_with_hostile(server, n, duration, queries, k, hostile, token, client_cpus))
        _print_level(results[-1])
      levels += results
  finally:
    exit_code = server.stop()
    if own_cpus is not None:
      os.sched_setaffinity(0, own_cpus)

  batches = sorted({max(1, round(level["mean_batch"])) for level in levels})
  in_process = _in_process_subprocess(model, batches, k, duration, server_cpus)
  for level in levels:
    batch = max(1, round(level["mean_batch"]))
    qps, ms_per_call = in_process[batch]
    level["in_process_batch"] = batch
    level["in_process_qps"] = round(qps, 2)
    level["in_process_ms_per_call"] = round(ms_per_call, 3)
    level["overhead"] = round(1 - level["throughput_qps"] / qps, 4)

  report = {
    "model": os.path.abspath(model),
    "k": k,
    "duration_s": duration,
    "hostile": hostile,
    "server_cpus": sorted(server_cpus),
    "client_cpus": sorted(client_cpus),
    "server_exit_code": exit_code,
    "levels": levels,
    "machine": common.machine_info(),
  }
  _print_table(report)
  os.makedirs(workdir, exist_ok=True)
  out = os.path.join(workdir, "bench_serve.json")
  io.write_json(out, report)
  print(f"bench serve: wrote {out}")
  return report


def _print_level(result: dict) -> None:
  extra = f" + {result['hostile']} hostile" if result.get("hostile") else ""
  print(
    f"bench serve: {result['clients']:>3} clients{extra}: {result['throughput_qps']:.1f} "
    f"q/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, mean batch "
    f"{result['mean_batch']}, {result['errors']} errors",
    flush=True,
  )
  if result.get("hostile_outcomes"):
    print(f"  hostile clients' requests: {result['hostile_outcomes']}", flush=True)


def _print_table(report: dict) -> None:
  print(
    f"\nbench serve: {report['model']}, k={report['k']}, {report['duration_s']:g} s per "
    f"level, server exit {report['server_exit_code']}"
  )
  header = (
    "clients",
    "requests",
    "errors",
    "q/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "mean batch",
    "compiles",
    "device busy",
    "ms/call",
    "in-proc q/s",
    "in-proc ms/call",
    "overhead",
  )
  print(" | ".join(header))
  print(" | ".join("-" * len(h) for h in header))
  for lv in report["levels"]:
    print(
      " | ".join(
        str(v)
        for v in (
          f"{lv['clients']} + {lv['hostile']} hostile" if lv.get("hostile") else lv["clients"],
          lv["requests"],
          lv["errors"],
          lv["throughput_qps"],
          lv["p50_ms"],
          lv["p95_ms"],
          lv["p99_ms"],
          lv["mean_batch"],
          lv["compiles_after_warmup"],
          f"{100 * lv['device_busy']:.1f} %",
          lv["device_ms_per_call"],
          lv["in_process_qps"],
          lv["in_process_ms_per_call"],
          f"{100 * lv['overhead']:.1f} %",
        )
      )
    )
  for lv in report["levels"]:
    extra = f" + {lv['hostile']} hostile" if lv.get("hostile") else ""
    print(f"  batch sizes at {lv['clients']} clients{extra}: {lv['batch_histogram']}")
    if lv.get("hostile_outcomes"):
      print(f"  hostile clients' requests at {lv['clients']} clients: {lv['hostile_outcomes']}")
