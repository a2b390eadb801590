"""Synchronising the JAX processes of a multi-host run; with one process every helper is free.

These are collectives over all processes' devices: they return once every process has called
them, however long that takes (checked: a gloo CPU collective waited 75 s for a late process;
TPU collectives do not time out). A process that dies instead ends the job
(avg_jax.cloud.local_multiprocess stops the others; on a pod the job is restarted), so nobody
waits forever. A file-based wait on the shared workdir would need polling and a timeout of its
own; every multi-process run already has the collectives.
"""

import jax
import numpy as np


def is_main() -> bool:
  """True in process 0, the one that writes files every process shares."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
  """`int64 [K]` counts summed over all processes. Also a barrier: after it, every process
  has finished whatever it did before the call."""
  counts = np.asarray(counts, np.int64)
  if jax.process_count() == 1:
    return counts
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)


def process_0_succeeded(ok: bool) -> bool:
  """Process 0's `ok`, on every process: the others wait here while process 0 finishes a
  stage's shared outputs, then learn whether it succeeded (and fail too if it did not)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def any_process(flag: bool) -> bool:
  """True if `flag` is true on any process (so every host stops at the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.asarray(flags).any())
