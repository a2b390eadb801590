"""`avg-jax bench data`: examples/s of the image pipeline (read + decode + batch).

Runs on the prepared data of `workdir` (prepared there first when missing, with the given
config: the smoke data by default) and compares reading records only, decoding with one
thread, decoding with the configured threads, and decoding in 2 worker processes.
Prints a table and writes `<workdir>/bench_data.json`.
"""

import os
import time
from typing import Any

from avg_jax.artifacts import io
from avg_jax.bench import common
from avg_jax.data import dataset, pipeline

BATCH_SIZE = 64


def _machine() -> dict:
  return common.machine_info()


def _command(args: Any) -> str:
  parts = [
    "avg-jax",
    "bench",
    "data",
    "--config",
    str(getattr(args, "config", "")),
    "--workdir",
    str(getattr(args, "workdir", "")),
  ]
  if getattr(args, "quick", False):
    parts.append("--quick")
  return " ".join(parts)


def measure(
  workdir: str,
  *,
  decode: bool,
  worker_count: int,
  read_threads: int,
  num_batches: int,
  batch_size: int,
  buffer_size: int,
) -> dict:
  """Times `num_batches` batches in steady state; returns one result row.

  `startup_s` is the time to the first batch (worker processes start then). The batches that
  prefetching may have buffered meanwhile are consumed untimed, so the rate is the
  pipeline's, not the buffer's (keep `num_batches` well above `buffer_size`).
  """
  source = dataset.image_source(workdir, "train", decode_image=decode)
  start = time.perf_counter()
  it = pipeline.batch_iterator(
    source,
    batch_size,
    shuffle=True,
    seed=0,
    num_epochs=None,
    drop_remainder=True,
    shard_by_process=False,
    worker_count=worker_count,
    read_threads=read_threads,
    prefetch_buffer_size=buffer_size,
  )
  try:
    first = next(it)
    startup = time.perf_counter() - start
    for _ in range(buffer_size + 2 * worker_count):
      next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
      batch = next(it)
    seconds = time.perf_counter() - start
  finally:
    if hasattr(it, "close"):
      it.close()
  assert batch["image_id"].shape == first["image_id"].shape == (batch_size,)
  examples = num_batches * batch_size
  return {
    "stage": "decode + batch" if decode else "read records + batch",
    "worker_count": worker_count,
    "read_threads": read_threads,
    "batch_size": batch_size,
    "examples": examples,
    "startup_s": round(startup, 3),
    "seconds": round(seconds, 3),
    "examples_per_s": round(examples / seconds, 1),
  }


# Stages the CLI runs first (idempotent: complete outputs are kept): benchmarks are
# libraries and never import a stage.
NEEDS_STAGES = ("prepare",)


def run(config: Any, workdir: str, args: Any) -> dict:
  """The benchmark (see the module docstring); returns what it writes to bench_data.json."""
  info = dataset.load_info(workdir)
  quick = bool(getattr(args, "quick", False))
  num_train = info["splits"]["train"]["num_images"]
  batch_size = min(BATCH_SIZE, num_train)
  # Full: four passes over the training images per row; quick: 4 batches.
  num_batches = 4 if quick else max(1, 4 * num_train // batch_size)
  threads = int(config.loader.read_threads)
  buffer_size = int(config.loader.prefetch_buffer_size)
  rows = []
  for decode, workers, row_threads in (
    (False, 0, threads),
    (True, 0, 1),
    (True, 0, threads),
    (True, 2, threads),
  ):
    rows.append(
      measure(
        workdir,
        decode=decode,
        worker_count=workers,
        read_threads=row_threads,
        num_batches=num_batches,
        batch_size=batch_size,
        buffer_size=buffer_size,
      )
    )
  result = {
    "bench": "data",
    "command": _command(args),
    "machine": _machine(),
    "dataset": info["dataset"],
    "image_size": info["image_size"],
    "image_encoding": info.get("image_encoding"),
    "num_train_images": num_train,
    "quick": quick,
    "results": rows,
  }

  header = (
    f"{'stage':<22} {'workers':>7} {'threads':>7} {'examples':>8} {'startup s':>9} "
    f"{'examples/s':>11}"
  )
  print(
    f"data pipeline: {info['dataset']} train, {info['image_size'][0]} px "
    f"{info.get('image_encoding')}, batch {batch_size}"
  )
  print(header)
  for r in rows:
    print(
      f"{r['stage']:<22} {r['worker_count']:>7} {r['read_threads']:>7} {r['examples']:>8} "
      f"{r['startup_s']:>9.2f} {r['examples_per_s']:>11.1f}"
    )
  path = os.path.join(workdir, "bench_data.json")
  io.write_json(path, result)
  print(f"wrote {path}")
  return result
