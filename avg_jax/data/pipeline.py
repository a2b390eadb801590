"""Batches from a random-access source through grain, with checkpointable iterator state.

    it = batch_iterator(image_source(workdir, "train"), 64, shuffle=True, seed=0,
                        num_epochs=None, drop_remainder=True)
    batch = next(it)              # {"image": uint8[64, H, W, 3], "captions": str[64, C], ...}
    state = it.get_state()        # save with the train state; it.set_state(state) resumes

Order of operations: shard by process -> shuffle (reseeded every epoch) -> repeat -> map_fn
(per element) -> batch -> batch_map_fn -> threads / worker processes. Everything before the
workers is index-based, so the iterator state is a position and a resumed run sees exactly
the batches it would have seen.
"""

from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np


def stack(elements: Sequence[Any]) -> Any:
  """Batches equal-structure elements: arrays/numbers -> `[B, ...]` arrays, strings -> str
  arrays `[B]`, lists of strings -> `[B, n]`, bytes -> object arrays `[B]`, dicts / tuples
  recursively."""
  first = elements[0]
  if isinstance(first, dict):
    return {k: stack([e[k] for e in elements]) for k in first}
  if isinstance(first, tuple):
    return tuple(stack([e[i] for e in elements]) for i in range(len(first)))
  if isinstance(first, bytes):
    # Object arrays: numpy's fixed-width bytes dtype would drop trailing NUL bytes.
    out = np.empty(len(elements), object)
    out[:] = elements
    return out
  if isinstance(first, (str, list)):
    return np.asarray(elements)
  return np.stack([np.asarray(e) for e in elements])


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside absl.app.run nobody has parsed them.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def shard_for_process(
  source: grain.MapDataset, process_index: int, process_count: int, *, equal_sizes: bool
) -> grain.MapDataset:
  """Elements `process_index::process_count`; with `equal_sizes` the source is first cut to
  a multiple of `process_count` so every process gets the same number of elements (and
  therefore of batches: hosts then stay in step)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if equal_sizes:
    source = source[: len(source) - len(source) % process_count]
  return source[process_index::process_count]


def batch_iterator(
  source: Any,
  batch_size: int,
  *,
  shuffle: bool,
  seed: int,
  num_epochs: int | None,
  drop_remainder: bool,
  shard_by_process: bool = True,
  worker_count: int = 0,
  map_fn: Callable[[Any], Any] | None = None,
  batch_map_fn: Callable[[Any], Any] | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_buffer_size: int = 2,
  read_threads: int = 8,
  prefetch_buffer_size: int = 16,
  global_order: bool = False,
) -> grain.DatasetIterator:
  """A grain iterator of batches (dicts of stacked numpy arrays) over `source`.

  `source`: a `grain.MapDataset` or any random-access sequence (`__len__`, `__getitem__`).
  `batch_size` is per process. `num_epochs=None` repeats forever; every epoch is shuffled
  differently (when `shuffle`). `shard_by_process` gives this process elements
  `process_index::process_count` (default: jax's); with `drop_remainder` all processes get
  equally many. `map_fn` runs on each element, `batch_map_fn` on each stacked batch, both
  inside the worker processes when `worker_count > 0`; they must be picklable then.
  Batches are formed before the threads / workers (each batch is read by one thread), so
  their contents do not depend on `worker_count`; `prefetch_buffer_size` counts batches.
  The iterator has `get_state()` / `set_state(state)`.

  `global_order` (training): the stream is shuffled and batched identically on every process
  and process p reads every `process_count`-th batch starting at p, so global step s sees the
  same `batch_size * process_count` examples whatever the number of processes (a 2-host run
  then reproduces a 1-host run exactly). Each process still reads only its own batches.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if shard_by_process and not global_order:
    ds = shard_for_process(ds, index, count, equal_sizes=drop_remainder)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  if map_fn is not None:
    ds = ds.map(map_fn)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=stack)
  if shard_by_process and global_order and count > 1:
    if not drop_remainder:
      raise ValueError("global_order needs drop_remainder=True (equal batches per process)")
    ds = ds[: len(ds) - len(ds) % count][index::count]
  if batch_map_fn is not None:
    ds = ds.map(batch_map_fn)
  iter_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size)
  )
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    iter_ds = iter_ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
      )
    )
  return iter(iter_ds)


def from_config(
  source: Any, batch_size: int, loader_config: Any, **kwargs
) -> grain.DatasetIterator:
  """`batch_iterator` with the worker / thread settings of the `loader` config section
  (and `seed=loader.shuffle_seed` unless given)."""
  kwargs.setdefault("seed", int(loader_config.shuffle_seed))
  return batch_iterator(
    source,
    batch_size,
    worker_count=int(loader_config.worker_count),
    worker_buffer_size=int(loader_config.worker_buffer_size),
    read_threads=int(loader_config.read_threads),
    prefetch_buffer_size=int(loader_config.prefetch_buffer_size),
    **kwargs,
  )
