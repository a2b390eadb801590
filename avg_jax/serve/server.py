"""The HTTP service's life: start-up, warm-up, listening, drain (`serve(args, token)`; the
command `avg-jax serve`, with its checks before anything loads, is avg_jax/cli/serve.py).

Start-up loads the Retriever once (one model copy), then compiles every program a request
can need on the device thread (every batch bucket for every k program; see `program_ks`),
checks that a second pass compiles nothing, and only then listens. It prints
`serve: listening on http://HOST:PORT` (the real port when `--port 0`).

k programs: the search runs a beam of max(beam_size, k) and keeps its first k results, so
every k <= min(beam_size, N) is answered from one program run with k = min(beam_size, N),
truncated (the same ids and scores as `Retriever.search(queries, k)`). Each larger k up to
`--max-k` is a program of its own; `--max-k` defaults to min(beam_size, N), one program.

SIGTERM / SIGINT: /healthz turns 503, the listening socket closes, queued searches run at
once, in-flight requests are answered (for at most `--drain-timeout` seconds), the process
exits 0.

The export's manifest is checked (`check_manifest`) before the model is read.
"""

import argparse
import asyncio
import logging
import signal
import time

from avg_jax.errors import UserError

log = logging.getLogger("avg_jax.serve")

WARMUP_QUERY = "warm-up"


def program_ks(base_k: int, max_k: int) -> list[int]:
  """The k each compiled program runs with: base_k for every k <= base_k, then each k."""
  return [base_k] + list(range(base_k + 1, max_k + 1))


def limits_for(retriever, args: argparse.Namespace):
  """(request limits, base_k) for this export and the command-line options."""
  from avg_jax.serve import requests as req_lib

  num_images = len(retriever.image_ids)
  base_k = min(retriever.beam_size, num_images)
  max_k = args.max_k or base_k
  if not 1 <= max_k <= num_images:
    raise UserError(
      f"serve --max-k: must be in [1, {num_images}] (the index size), got {args.max_k}"
    )
  default_k = min(retriever.decode.top_k, max_k)
  return req_lib.Limits(
    max_k=max_k,
    default_k=max(default_k, 1),
    max_queries=args.max_queries,
    max_query_chars=retriever.max_query_chars,
  ), base_k


def warm_up(retriever, ks: list[int], metrics) -> None:
  """Compiles every (bucket, k program) on the calling (device) thread, then checks that a
  second pass compiles nothing."""
  start, before = time.perf_counter(), metrics.compile_count
  for k in ks:
    for bucket in retriever.buckets:
      retriever.search([WARMUP_QUERY] * bucket, k=k)
  seconds = time.perf_counter() - start
  compiled = metrics.compile_count - before
  for k in ks:
    for bucket in retriever.buckets:
      retriever.search([WARMUP_QUERY] * bucket, k=k)
  again = metrics.compile_count - before - compiled
  metrics.warmup_seconds.set(seconds)
  log.info(
    "serve: warm-up compiled buckets %s x k programs %s in %.1f s (%d XLA compiles); "
    "a second pass compiled %d",
    list(retriever.buckets),
    ks,
    seconds,
    compiled,
    again,
  )
  if again:
    log.warning("serve: the search still compiles after warm-up; requests may stall")


def rewarm(retriever, ks: list[int], metrics) -> None:
  """After an index change (on the device thread, before searches resume): compiles every
  (bucket, k program) for the new tree, so no request compiles."""
  start = time.perf_counter()
  for k in ks:
    for bucket in retriever.buckets:
      retriever.search([WARMUP_QUERY] * bucket, k=k)
  metrics.rewarm_seconds.observe(time.perf_counter() - start)
  log.info(
    "serve: index changed (%d images); search compiled again in %.1f s",
    len(retriever.image_ids),
    time.perf_counter() - start,
  )


async def serve(args: argparse.Namespace, token: str | None) -> None:
  from aiohttp import web

  from avg_jax.inference import gallery as gallery_lib
  from avg_jax.inference.retriever import Retriever, check_manifest
  from avg_jax.serve.batcher import Batcher
  from avg_jax.serve.metrics import Metrics
  from avg_jax.serve.routes import Service, WriteAccess, build_app
  from avg_jax.serve.uploads import Uploads

  start = time.perf_counter()
  check_manifest(args.model)  # one line for a bad manifest, before the model is read
  retriever = Retriever.load(args.model)
  gallery = gallery_lib.read(args.model)
  limits, base_k = limits_for(retriever, args)
  metrics = Metrics(retriever.buckets)
  metrics.listen_for_compiles()
  metrics.index_images.set(len(retriever.image_ids))
  log.info(
    "serve: loaded %s (%d images, %s) in %.1f s",
    args.model,
    len(retriever.image_ids),
    "with thumbnails" if gallery is not None else "no gallery: results without pictures",
    time.perf_counter() - start,
  )
  uploads = None
  live = retriever.manifest.get("live")
  if token is not None and live is not None:
    uploads = Uploads(
      image_size=int(live["image_size"]),
      workers=args.decode_workers,
      timeout_s=args.image_timeout,
      max_pixels=args.max_image_pixels,
    )
    uploads.start()
  log.info(
    "serve: %s",
    "writes allowed with the bearer token"
    if token is not None
    else "read-only (POST / DELETE /v1/images answer 403; --allow-writes to change)",
  )
  batcher = Batcher(
    retriever.search,
    max_batch=max(retriever.buckets),
    wait_s=args.batch_wait_ms / 1000,
    metrics=metrics,
  )
  ks = program_ks(base_k, limits.max_k)
  await asyncio.wrap_future(batcher.run_on_device(warm_up, retriever, ks, metrics))
  metrics.mark_warm()

  service = Service(
    retriever=retriever,
    gallery=gallery,
    batcher=batcher,
    metrics=metrics,
    limits=limits,
    base_k=base_k,
    rewarm=lambda: rewarm(retriever, ks, metrics),
    max_add_images=args.max_add_images,
    uploads=uploads,
    writes=WriteAccess(token=token, origins=frozenset(o.lower() for o in args.allowed_origin)),
  )
  runner = web.AppRunner(
    build_app(service, args.max_body_bytes), access_log=None, shutdown_timeout=1.0
  )
  await runner.setup()
  site = web.TCPSite(runner, args.host, args.port)
  try:
    await site.start()
  except OSError as e:
    await runner.cleanup()
    if uploads is not None:
      uploads.close()
    raise UserError(f"serve: cannot listen on {args.host}:{args.port} ({e.strerror})") from e
  batcher.start()
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  host, port = runner.addresses[0][:2]
  print(f"serve: listening on http://{host}:{port}", flush=True)
  await stop.wait()

  # Drain: refuse new connections, answer what is in flight, then stop.
  service.draining = True
  metrics.draining.set(1)
  log.info("serve: SIGTERM: draining %d in-flight requests", service.active_requests)
  await site.stop()
  batcher.stop_waiting()
  deadline = time.monotonic() + args.drain_timeout
  while service.active_requests and time.monotonic() < deadline:
    await asyncio.sleep(0.01)
  if service.active_requests:
    log.warning(
      "serve: %d requests still running after %.0f s; closing them",
      service.active_requests,
      args.drain_timeout,
    )
  await batcher.close()
  if uploads is not None:
    uploads.close()
  await runner.cleanup()
  log.info("serve: stopped")
