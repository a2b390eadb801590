"""`avg-jax prepare`: dataset -> ArrayRecord files + text tokenizer + dataset_info.json.

What the prepared folder holds and how it is built: avg_jax/data/prepared.py.

Several processes (a multi-host run) share the work: the images are cut into shards of
`data.examples_per_shard` (avg_jax.data.builders), process p of n writes shards p, p+n, ...
into `paths.prepared_shards_dir(workdir)`, skipping those a previous run finished. Once every
shard exists, process 0 alone lays them out as the TFDS directory, trains the tokenizer and
writes the statistics and dataset_info.json, while the others wait for it.

Atomic and idempotent: process 0 assembles everything in a temporary folder next to
`prepared/` (avg_jax.artifacts.io.temp_dir) and renames it into place, so `prepared/` is either
absent or complete (the shards directory is then removed). A complete folder from the same data
identity is kept (and reported as such); one that fails its manifest check (a half-written or
damaged copy) is removed and redone, as are temp folders left by interrupted runs; one prepared
from a different data config is an error (later stages built on it would be stale).
"""

import os
import shutil
import time
from typing import Any

import jax
import numpy as np

from avg_jax import processes
from avg_jax.artifacts import fingerprint, io, locks, paths, stage_inputs
from avg_jax.data import builders, prepared
from avg_jax.errors import UserError
from avg_jax.metrics import MetricsWriter


def _write_metrics(
  workdir: str,
  info: dict,
  *,
  reused: bool,
  seconds: float,
  shard_counts: dict | None = None,
  build_seconds: dict | None = None,
) -> None:
  """One record per split; `shard_counts[split] = (shards, skipped, written)` over all
  processes and `build_seconds` (process 0's serial steps after the shards: what more
  processes do not shorten) when this run built the data."""
  writer = MetricsWriter(workdir, "prepare", process_index=jax.process_index())
  for split, s in info["splits"].items():
    shards = {}
    if shard_counts is not None:
      total, skipped, written = shard_counts[split]
      shards = dict(shards=total, shards_skipped=skipped, shards_written=written)
    if build_seconds is not None:
      shards["build_seconds"] = build_seconds
    writer.write(
      split=split,
      dataset=info["dataset"],
      num_images=s["num_images"],
      num_captions=s["num_captions"],
      mean_caption_tokens=s["mean_caption_tokens"],
      vocab_size=info["text_tokenizer"]["vocab_size"],
      reused=reused,
      seconds=round(seconds, 3),
      **shards,
    )


def _finish(
  workdir: str, out: fingerprint.Output, config: Any, source: builders.Source
) -> tuple[dict, dict]:
  """Process 0, once every shard exists: `prepared/` from the shards, atomically; -> (info,
  seconds of the serial steps)."""
  out_dir = paths.prepared_dir(workdir)
  shards_dir = paths.prepared_shards_dir(workdir)
  if prepared.check_prepared(out_dir)[0] == "incomplete":
    shutil.rmtree(out_dir)
  tmp = io.temp_dir(out_dir)
  try:
    info, build_seconds = prepared.build(config, tmp, out.inputs, source, shards_dir)
    out.finish(into=tmp)
    if not io.publish_dir(tmp, out_dir):
      # Another job (e.g. started separately on a shared workdir) finished first: keep its
      # output if it is complete and from the same data identity.
      if prepared.check_prepared(out_dir)[0] != "complete" or not out.done():
        raise UserError(
          f"{out_dir} appeared while this run prepared the data and is not a "
          "complete output from the same inputs: remove it and rerun"
        )
      shutil.rmtree(tmp, ignore_errors=True)
      print(f"{out_dir} was completed by another process meanwhile; kept it")
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  # The records now live in prepared/ (hard links or copies): the shards are no longer needed.
  shutil.rmtree(shards_dir, ignore_errors=True)
  return info, build_seconds


@locks.holding("prepare")
def run(
  config: Any, workdir: str, *, process_index: int | None = None, process_count: int | None = None
) -> None:
  """The prepare stage (see the module docstring). `process_index` / `process_count` default
  to jax's; tests pass others to play one process of several."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  start = time.time()
  out_dir = paths.prepared_dir(workdir)
  os.makedirs(workdir, exist_ok=True)
  out = fingerprint.Output(
    out_dir,
    prepared.data_identity(config),
    stage="prepare",
    on_other=stage_inputs.STAGES["prepare"].on_other,
  )
  if index == 0:
    for path in io.remove_stale_temps(out_dir):
      print(f"removed {path}: left by an interrupted prepare")

  # Every process sees the same state here: prepared/ only changes after all have written
  # their shards (below).
  status, reason, found = prepared.check_prepared(out_dir)
  # out.done() refuses a folder from another data identity.
  if status == "complete" and found is not None and out.done():
    print(f"{out_dir} is complete for this data config (hash {found['config_hash']}); kept")
    print(prepared.format_statistics(found))
    _write_metrics(workdir, found, reused=True, seconds=time.time() - start)
    return
  if status == "incomplete" and index == 0:
    print(f"{out_dir} is incomplete ({reason}); preparing it again")

  source = builders.open_source(config.data)
  counts = builders.write_shards(
    source, paths.prepared_shards_dir(workdir), prepared.shard_tag(out.inputs), index, count
  )
  # A collective: once it returns, every process has written its shards.
  totals = processes.sum_over_processes(np.array([counts[s] for s in builders.SPLITS]))
  error = None
  if index == 0:
    try:
      info, build_seconds = _finish(workdir, out, config, source)
    except Exception as e:  # pylint: disable=broad-except (re-raised below, after telling
      error = e  # the other processes, which would otherwise wait forever)
  if not processes.process_0_succeeded(error is None):
    if error is not None:
      raise error
    raise UserError(f"prepare failed in process 0 (see its error); {out_dir} was not written")
  if index != 0:
    print(f"{out_dir} was prepared by process 0")
    return
  print(f"prepared {info['dataset']} in {out_dir} ({time.time() - start:.1f} s)")
  print(prepared.format_statistics(info))
  shard_counts = {s: tuple(int(x) for x in totals[i]) for i, s in enumerate(builders.SPLITS)}
  _write_metrics(
    workdir,
    info,
    reused=False,
    seconds=time.time() - start,
    shard_counts=shard_counts,
    build_seconds=build_seconds,
  )
