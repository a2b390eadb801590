"""The train-step shape every trainer shares (dual encoder, generator, LTR) and the loop that
drives it.

A step is a pure function `(state, batch, rng) -> (state, metrics)`: the rng is the run's base
key and each step folds in its own step number, so a resumed run draws the same dropout masks as
an uninterrupted one. A step whose loss or gradient norm is not finite leaves the state
unchanged and reports `finite = False`; the loop then stops with an error naming that step and
saves nothing after it, so the last good checkpoint stays the newest.
"""

import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from avg_jax import processes
from avg_jax.artifacts.checkpoints import Checkpointer
from avg_jax.errors import Preempted, UserError
from avg_jax.metrics import MetricsWriter
from avg_jax.progress import progress


class TrainingDiverged(UserError):
  """Loss or gradients became NaN/inf."""


# optax.tree.norm replaces optax.global_norm in newer optax.
_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  opt_state: Any


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """A fresh `TrainState` (use under `jax.jit` with out_shardings to keep it sharded)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_train_step(
  loss_fn: Callable[..., tuple[jax.Array, dict]],
  tx: optax.GradientTransformation,
  schedule: optax.Schedule | None = None,
) -> Callable:
  """Builds `(state, batch, rng) -> (state, metrics)` from `loss_fn(params, batch, rng)`.

  `loss_fn` returns `(scalar loss, dict of scalar metrics)`.
  """

  def train_step(state: TrainState, batch: Any, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, step_rng)
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Keep the last good parameters when this step diverged (the loop stops right after).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
    )
    metrics = dict(aux, loss=loss, grad_norm=grad_norm, finite=finite)
    if schedule is not None:
      metrics["learning_rate"] = schedule(state.step)
    return new_state, metrics

  return train_step


class StopSignal:
  """Turns SIGTERM (preemption) into a flag the train loop checks between steps.

  Only installs a handler when running in the main thread; restores the old handler on exit.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def set(self) -> None:
    self._event.set()


def fit(
  *,
  step_fn: Callable,
  state: TrainState,
  rng: jax.Array,
  batches: Iterator[Any],
  num_steps: int,
  checkpointer: Checkpointer,
  checkpoint_every: int,
  writer: MetricsWriter,
  data_iter: Any = None,
  metadata: dict | None = None,
  log_every: int = 10,
  examples_per_step: int = 0,
  eval_fn: Callable[[TrainState], dict] | None = None,
  eval_every: int = 0,
  stop: StopSignal | None = None,
  desc: str = "train",
) -> TrainState:
  """Runs `step_fn` from `state.step` to `num_steps`, logging, checkpointing and evaluating.
  A `state` past step 0 (restored) is announced, and `writer`'s records past it are dropped.

  `batches` yields device-ready batches; `data_iter` is the grain iterator behind it, saved
  with each checkpoint. Raises `TrainingDiverged` on a non-finite step and `Preempted` after
  saving when `stop` is requested or the platform signals preemption.
  """
  start = int(jax.device_get(state.step))
  if start:
    # Say so (a resumed run otherwise looks like a fresh one), and forget the records of the
    # steps about to be redone so that metrics.jsonl holds each step once.
    print(f"{desc}: resumed from step {start} ({checkpointer.directory})")
    writer.drop_after(start)
  pending: list[tuple[int, dict]] = []
  last_log_time, last_log_step = time.perf_counter(), start
  stop = stop or StopSignal()

  def flush(step: int) -> None:
    nonlocal last_log_time, last_log_step
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      if not bool(m["finite"]):
        good = checkpointer.latest_step()
        where = f"; last good checkpoint: step {good} in {checkpointer.directory}" if good else ""
        raise TrainingDiverged(
          f"loss or gradient is not finite at step {s} (loss={float(m['loss'])}){where}"
        )
    now = time.perf_counter()
    mean = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1] if k != "finite"}
    if "learning_rate" in mean:
      mean["learning_rate"] = float(fetched[-1][1]["learning_rate"])
    steps_done = step - last_log_step
    if examples_per_step and steps_done:
      mean["examples_per_s"] = examples_per_step * steps_done / max(now - last_log_time, 1e-9)
    writer.write(step=step, **mean)
    bar.set_postfix(loss=f"{mean['loss']:.4f}")
    last_log_time, last_log_step = now, step

  bar = progress(range(start, num_steps), total=num_steps, desc=desc, unit="step")
  if hasattr(bar, "update") and start:
    bar.update(start)
  step = start
  for step in range(start + 1, num_steps + 1):
    state, metrics = step_fn(state, next(batches), rng)
    pending.append((step, metrics))
    if hasattr(bar, "update"):
      bar.update(1)
    last = step == num_steps
    save_now = last or (checkpoint_every and step % checkpoint_every == 0)
    preempt = processes.any_process(stop.requested) or checkpointer.reached_preemption(step)
    if last or preempt or save_now or step % max(log_every, 1) == 0:
      flush(step)
    if save_now or preempt:
      checkpointer.save(step, state, data_iter=data_iter, metadata=metadata)
    if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
      writer.write(step=step, **eval_fn(state))
    if preempt and not last:
      checkpointer.wait()
      raise Preempted(step, checkpointer.directory)
  if hasattr(bar, "close"):
    bar.close()
  checkpointer.wait()
  return state
