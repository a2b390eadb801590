"""Dynamic batching: concurrent searches gathered into one Retriever call on one device thread.

Requests wait in one FIFO queue. The batching loop takes the oldest job, gathers for at most
`wait_s` after it arrived (or until the largest bucket is full; at once while draining) the
queued jobs that run the same compiled program, and hands them as one
`search_fn(texts, program_k)` call to a single worker thread: one model copy, one device queue,
at most one search in flight. While that call runs, new requests queue up, so under load the
next batch leaves at once and fills up to the largest bucket without waiting. The Retriever
pads a batch to the smallest bucket that fits; warm-up compiled every bucket, so batching never
compiles.

A job never holds more queries than the largest bucket (`submit` splits larger requests), so
every call is one compiled program. `program_k` is the k the program runs with: searches whose
k differ only in how many results they keep share it (see server.program_k).
"""

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from avg_jax.serve.metrics import Metrics

log = logging.getLogger("avg_jax.serve")

SearchFn = Callable[[list[str], int], tuple[np.ndarray, np.ndarray]]


class Closed(Exception):
  """The batcher is draining or stopped: no new searches."""


@dataclasses.dataclass
class _Job:
  texts: list[str]
  program_k: int
  future: asyncio.Future
  enqueued: float


class Batcher:
  def __init__(self, search_fn: SearchFn, *, max_batch: int, wait_s: float, metrics: Metrics):
    self._search_fn = search_fn
    self.max_batch = int(max_batch)
    self.wait_s = float(wait_s)
    self._metrics = metrics
    self._queue: collections.deque[_Job] = collections.deque()
    self._changed = asyncio.Event()
    self._closing = False
    self._no_wait = False
    self._executor = concurrent.futures.ThreadPoolExecutor(
      max_workers=1, thread_name_prefix="avg-jax-device"
    )
    self._task: asyncio.Task | None = None

  def start(self) -> None:
    self._task = asyncio.get_running_loop().create_task(self._run(), name="avg-jax-batcher")

  def run_on_device(self, fn: Callable, *args):
    """Runs `fn(*args)` on the device thread (a `concurrent.futures.Future`); for warm-up."""
    return self._executor.submit(fn, *args)

  async def submit(self, texts: list[str], program_k: int) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [Q, program_k], scores [Q, program_k])` for `texts`, in order."""
    if self._closing:
      raise Closed("the server is shutting down")
    loop = asyncio.get_running_loop()
    jobs = []
    for start in range(0, len(texts), self.max_batch):
      job = _Job(
        texts[start : start + self.max_batch], program_k, loop.create_future(), time.monotonic()
      )
      self._queue.append(job)
      jobs.append(job)
    self._metrics.queue_depth.set(sum(len(j.texts) for j in self._queue))
    self._changed.set()
    parts = await asyncio.gather(*(j.future for j in jobs))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

  def stop_waiting(self) -> None:
    """From now on a batch leaves as soon as the device is free (for draining)."""
    self._no_wait = True
    self._changed.set()

  async def close(self) -> None:
    """Refuses new searches, answers every queued one (without waiting to gather more), then
    stops the device thread."""
    self._closing = self._no_wait = True
    self._changed.set()
    if self._task is not None:
      await self._task
    self._executor.shutdown(wait=True)

  def _take_batch(self) -> list[_Job]:
    """The oldest job and, in queue order, the same-program jobs that fit beside it."""
    first = self._queue[0]
    batch: list[_Job] = []
    size, rest = 0, collections.deque[_Job]()
    while self._queue:
      job = self._queue.popleft()
      if job.program_k == first.program_k and size + len(job.texts) <= self.max_batch:
        batch.append(job)
        size += len(job.texts)
      else:
        rest.append(job)
    self._queue.extendleft(reversed(rest))
    return batch

  def _ready(self) -> bool:
    """Whether the oldest job should leave now: the window is over, its program's bucket is
    full, or the server is draining."""
    first = self._queue[0]
    if self._no_wait or time.monotonic() - first.enqueued >= self.wait_s:
      return True
    same = sum(len(j.texts) for j in self._queue if j.program_k == first.program_k)
    return same >= self.max_batch

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      if not self._queue:
        if self._closing:
          return
        self._changed.clear()
        await self._changed.wait()
        continue
      if not self._ready():
        self._changed.clear()
        remaining = self.wait_s - (time.monotonic() - self._queue[0].enqueued)
        try:
          await asyncio.wait_for(self._changed.wait(), timeout=max(remaining, 0.0))
        except TimeoutError:
          pass
        continue
      batch = self._take_batch()
      self._metrics.queue_depth.set(sum(len(j.texts) for j in self._queue))
      texts = [t for job in batch for t in job.texts]
      program_k = batch[0].program_k
      self._metrics.batch_size.observe(len(texts))
      start = time.perf_counter()
      try:
        ids, scores = await loop.run_in_executor(self._executor, self._search_fn, texts, program_k)
      except Exception as e:  # noqa: BLE001 - one failed call must not stop the loop
        log.exception("search of a batch of %d queries failed", len(texts))
        for job in batch:
          if not job.future.done():
            job.future.set_exception(e)
        continue
      finally:
        self._metrics.device_seconds.observe(time.perf_counter() - start)
      offset = 0
      for job in batch:
        n = len(job.texts)
        if not job.future.done():  # its request may have been cancelled meanwhile
          job.future.set_result((ids[offset : offset + n], scores[offset : offset + n]))
        offset += n
