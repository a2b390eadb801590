"""Orbax checkpoints: train state, grain iterator state and JSON metadata; final parameters.

Resume priority (see `resume_or_init` callers): an existing checkpoint in the workdir, then an
explicit init checkpoint, then from scratch. A latest checkpoint that cannot be restored
(corrupt or half-written) is skipped with a warning naming it, and the previous good one is
used. Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves no step that looks finished.

Each committed step (and the final parameters) carries `checksums.json`
(avg_jax/artifacts/checksums.py); a step whose bytes changed since is skipped like an
unreadable one, and final parameters that changed are an error naming the file. A step
committed just before a crash may lack the record: it is restored unverified (logged).
"""

import logging
import os
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from avg_jax import processes
from avg_jax.artifacts import checksums
from avg_jax.errors import UserError

log = logging.getLogger(__name__)

# Orbax saves a replicated array replica-parallel by default (each replica writes a slice of
# it), and each slice is a small program of its own, one per (shape, device), compiled at a
# process's first save: the tiny embed, tokenize and train stages on 8 devices compiled 120
# such slices among their 198 programs. Below this many bytes per replica that buys nothing,
# so smaller arrays are written whole by one replica; larger ones keep the parallel write.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's pytree handler for states and parameters, with jax arrays saved by
  `REPLICA_PARALLEL_MIN_SLICE_BYTES`'s rule. The files are the same as `StandardSave`'s (each
  form reads the other's)."""
  scalar = ocp.type_handlers.ScalarHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
    (int, scalar),
    (float, scalar),
    (bytes, scalar),
    (np.number, scalar),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (
      jax.Array,
      ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES
      ),
    ),
    (str, ocp.type_handlers.StringHandler()),
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  """Restores into `abstract`'s shapes, dtypes and shardings (leaves: `jax.ShapeDtypeStruct`)."""
  return ocp.args.PyTreeRestore(
    item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
  )


class Checkpointer:
  """A `CheckpointManager` over items `state`, `data_iter` (optional) and `metadata`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=True,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
    )
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = _pytree_handler()
    handlers.add("state", ocp.args.PyTreeSave, state_handler)
    handlers.add("state", ocp.args.PyTreeRestore, state_handler)
    handlers.add("metadata", ocp.args.JsonSave)
    handlers.add("metadata", ocp.args.JsonRestore)
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=handlers)
    self._unrecorded: list[int] = []

  def _record_committed(self) -> None:
    """Writes the checksums of the steps saved since the last call, once orbax committed them.

    Hooked where the save is known complete (the start of the next `save`, `wait`, `close`)
    rather than into orbax's `post_finalization_callback`: that callback does not say which
    step it finished and is refused for synchronous saving; and orbax's own `save` waits for
    the previous save first, so waiting here costs no overlap of saving with training.
    """
    self.manager.wait_until_finished()
    pending, self._unrecorded = self._unrecorded, []
    if not processes.is_main():
      return
    for step in pending:
      path = os.path.join(self.directory, str(step))
      if os.path.isdir(path):  # else already removed by max_to_keep
        checksums.write(path)

  def save(
    self,
    step: int,
    state: Any,
    *,
    data_iter: Any = None,
    metadata: dict | None = None,
    force: bool = True,
  ) -> None:
    """Saves `state` (a pytree of jax arrays), the iterator state and `metadata` at `step`."""
    items = {
      "state": ocp.args.PyTreeSave(state),
      "metadata": ocp.args.JsonSave(dict(metadata or {}, step=int(step))),
    }
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._record_committed()
    if self.manager.save(int(step), args=ocp.args.Composite(**items), force=force):
      self._unrecorded.append(int(step))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def restore(self, step: int, abstract_state: Any, *, data_iter: Any = None) -> tuple[Any, dict]:
    """Restores `(state, metadata)` at `step`; `data_iter` is restored in place. Raises
    `UserError` when the step's files changed since they were written."""
    path = os.path.join(self.directory, str(step))
    if checksums.has_record(path):
      problem = checksums.verify(path)
      if problem:
        raise UserError(problem)
    else:
      log.info(
        "checkpoint %s has no %s (saved just before a crash, or by an older avg-jax); "
        "restoring it unverified",
        path,
        checksums.NAME,
      )
    items = {"state": _restore_args(abstract_state), "metadata": ocp.args.JsonRestore()}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
    return restored["state"], dict(restored["metadata"] or {})

  def restore_latest_good(
    self, abstract_state: Any, *, data_iter: Any = None
  ) -> tuple[int, Any, dict] | None:
    """Restores the newest checkpoint that loads; `None` when there is none.

    A checkpoint that fails to load is reported with its path and skipped.
    """
    for step in reversed(self.steps()):
      try:
        state, metadata = self.restore(step, abstract_state, data_iter=data_iter)
        return step, state, metadata
      except Exception as e:  # orbax raises many types for damaged files
        path = os.path.join(self.directory, str(step))
        aside = self._set_aside(step)
        log.warning(
          "checkpoint %s cannot be restored (%s: %s); moved to %s, trying the previous one",
          path,
          type(e).__name__,
          str(e).splitlines()[0][:200] if str(e) else "",
          aside,
        )
    return None

  def _set_aside(self, step: int) -> str:
    """Renames the unreadable step directory out of orbax's sight and returns the new path.

    Kept (not deleted) for inspection; moved because the resumed run will reach `step` again
    and orbax refuses to save over an existing step.
    """
    path = os.path.join(self.directory, str(step))
    # One process renames (the workdir is shared); the others only wait for it.
    if processes.is_main():
      aside = f"{path}.unreadable-{int(time.time())}"
      os.rename(path, aside)
    else:
      aside = f"{path}.unreadable-* (renamed by process 0)"
    processes.barrier(f"checkpoint set aside {step}")
    self.manager.reload()
    return aside

  def reached_preemption(self, step: int) -> bool:
    """True when the platform (e.g. a TPU pod's maintenance event) asks all hosts to stop."""
    return self.manager.reached_preemption(int(step))

  def wait(self) -> None:
    self._record_committed()

  def close(self) -> None:
    self._record_committed()
    self.manager.close()


def write_pytree(directory: str, tree: Any) -> None:
  """Writes a pytree of arrays to `directory` (replacing one left by an interrupted run) and
  waits until it is complete; orbax renames it into place only then. Read it back with
  `load_params` (or orbax's `StandardRestore`: the files are the same)."""
  checkpointer = ocp.Checkpointer(_pytree_handler())
  try:
    checkpointer.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree), force=True)
  finally:
    checkpointer.close()


def save_params(directory: str, params: Any) -> None:
  """Writes final parameters (no optimizer state) to `directory`; orbax renames it into place
  only when complete, so its existence means a finished stage."""
  write_pytree(directory, params)
  if processes.is_main():
    checksums.write(os.path.abspath(directory))
  processes.barrier(f"checksums of {directory}")


def load_params(directory: str, abstract_params: Any) -> Any:
  """Reads parameters saved by `save_params`; `abstract_params` leaves are
  `jax.ShapeDtypeStruct`s with the target shardings."""
  if not os.path.isdir(directory):
    raise UserError(f"parameters not found: {directory}")
  # Parameters saved by an older avg-jax have no record and load unverified.
  problem = checksums.verify(directory) if checksums.has_record(directory) else ""
  if problem:
    raise UserError(f"parameters damaged: {problem}")
  checkpointer = ocp.Checkpointer(_pytree_handler())
  try:
    return checkpointer.restore(os.path.abspath(directory), args=_restore_args(abstract_params))
  except Exception as e:  # a damaged checkpoint: name it, do not guess
    raise UserError(
      f"cannot read parameters in {directory}: {type(e).__name__}: "
      f"{str(e).splitlines()[0][:200] if str(e) else ''}"
    ) from e
  finally:
    checkpointer.close()


def restore_params_from(directory: str, abstract_state: Any) -> Any:
  """Reads the newest good checkpoint's state from another stage's directory (init)."""
  if not os.path.isdir(directory):
    raise UserError(f"init checkpoint directory not found: {directory}")
  checkpointer = Checkpointer(directory, async_save=False)
  try:
    found = checkpointer.restore_latest_good(abstract_state)
  finally:
    checkpointer.close()
  if found is None:
    raise UserError(f"no restorable checkpoint in {directory}")
  return found[1]
