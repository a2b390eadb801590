"""The generic train step and loop: resume equality, corrupt-checkpoint fallback, NaN stop,
SIGTERM-style preemption. A linear model keeps it fast; the real stages use the same code."""

import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flip_bytes, largest_file

from avg_jax import loop
from avg_jax.artifacts import checksums
from avg_jax.artifacts.checkpoints import Checkpointer
from avg_jax.errors import Preempted
from avg_jax.loop import StopSignal
from avg_jax.metrics import MetricsWriter, read_metrics
from avg_jax.training import optim

NUM_STEPS = 12


def _data(nan_at_batch=None):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(96, 3)).astype(np.float32)
  y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.1).astype(np.float32)

  def record(i):
    return {"x": x[i], "y": y[i]}

  def poison(index, batch):
    if index == nan_at_batch:
      batch = dict(batch, x=np.full_like(batch["x"], np.nan))
    return batch

  ds = grain.MapDataset.range(96).shuffle(seed=3).map(record).batch(4).map_with_index(poison)
  return ds.to_iter_dataset()


def _loss_fn(params, batch, rng):
  # Dropout-like noise makes the result depend on the per-step rng (checks fold_in on resume).
  noise = jax.random.bernoulli(rng, 0.9, batch["x"].shape)
  pred = (batch["x"] * noise) @ params["w"] + params["b"]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"mse": loss}


def _optimizer(num_steps=NUM_STEPS):
  schedule = optim.warmup_linear_schedule(0.05, num_steps, 2)
  return schedule, optim.adamw(schedule, grad_clip_norm=1.0)


def _run(workdir, *, stop_after=None, nan_at_batch=None, num_steps=NUM_STEPS):
  schedule, tx = _optimizer(num_steps)
  step_fn = jax.jit(loop.make_train_step(_loss_fn, tx, schedule), donate_argnums=(0,))
  params = {"w": jnp.zeros((3,)), "b": jnp.zeros(())}
  state = loop.create_state(params, tx)
  data_iter = iter(_data(nan_at_batch))
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"), keep=5, async_save=False)
  found = ckpt.restore_latest_good(jax.eval_shape(lambda: state), data_iter=data_iter)
  if found:
    state = found[1]
  stop = StopSignal()

  def batches():
    for i, b in enumerate(data_iter):
      if stop_after is not None and i + 1 >= stop_after:
        stop.set()  # as if SIGTERM arrived during this step
      yield b

  try:
    state = loop.fit(
      step_fn=step_fn,
      state=state,
      rng=jax.random.key(7),
      batches=batches(),
      num_steps=num_steps,
      checkpointer=ckpt,
      checkpoint_every=4,
      writer=MetricsWriter(workdir, "train"),
      data_iter=data_iter,
      log_every=2,
      examples_per_step=4,
      stop=stop,
    )
  finally:
    ckpt.close()
  return state


def test_resume_after_preemption_is_bit_identical(tmp_path):
  reference = _run(str(tmp_path / "a"))
  with pytest.raises(Preempted, match="preempted at step 5"):
    _run(str(tmp_path / "b"), stop_after=5)
  assert Checkpointer(str(tmp_path / "b" / "ckpt")).latest_step() == 5
  resumed = _run(str(tmp_path / "b"))
  assert int(resumed.step) == NUM_STEPS
  np.testing.assert_array_equal(resumed.params["w"], reference.params["w"])
  np.testing.assert_array_equal(resumed.params["b"], reference.params["b"])
  records = [r for r in read_metrics(str(tmp_path / "a")) if r["stage"] == "train"]
  assert records[-1]["step"] == NUM_STEPS and "examples_per_s" in records[-1]
  assert records[-1]["loss"] < records[0]["loss"]


def test_resume_after_a_crash_logs_each_step_once(tmp_path, capsys):
  reference = _run(str(tmp_path / "a"))
  crashed = tmp_path / "b"
  _run(str(crashed))
  # As if killed right after logging step 12 but before saving steps 8 and 12: the rerun
  # resumes from step 4 and redoes steps 5..12.
  for step in ("8", "12"):
    shutil.rmtree(crashed / "ckpt" / step)
  capsys.readouterr()
  resumed = _run(str(crashed))
  assert f"train: resumed from step 4 ({crashed / 'ckpt'})" in capsys.readouterr().out
  np.testing.assert_array_equal(resumed.params["w"], reference.params["w"])
  logged = lambda d: [(r["step"], r["loss"]) for r in read_metrics(str(d)) if "loss" in r]
  assert logged(crashed) == logged(tmp_path / "a")  # each step once, with the same values
  assert [s for s, _ in logged(crashed)] == [2, 4, 6, 8, 10, 12]


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
  _run(str(tmp_path))
  directory = tmp_path / "ckpt"
  assert sorted(int(p) for p in os.listdir(directory) if p.isdigit()) == [4, 8, 12]
  # Damage every file of the state item of step 12.
  for root, _, files in os.walk(directory / "12" / "state"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"\x00garbage")
  abstract = jax.eval_shape(
    lambda: loop.create_state({"w": jnp.zeros((3,)), "b": jnp.zeros(())}, _optimizer()[1])
  )
  with caplog.at_level(logging.WARNING):
    step, state, metadata = Checkpointer(str(directory)).restore_latest_good(abstract)
  assert step == 8 and int(state.step) == 8 and metadata["step"] == 8
  assert "12" in caplog.text and "cannot be restored" in caplog.text
  # The damaged step is kept aside, and the resumed run can save step 12 again.
  (aside,) = [p for p in os.listdir(directory) if p.startswith("12.unreadable-")]
  assert sorted(int(p) for p in os.listdir(directory) if p.isdigit()) == [4, 8]
  checkpointer = Checkpointer(str(directory), async_save=False)
  checkpointer.save(12, state)
  checkpointer.wait()
  assert checkpointer.steps() == [4, 8, 12]
  assert os.path.isdir(directory / aside)


def test_nan_stops_with_the_step_and_keeps_good_checkpoint(tmp_path):
  # Batch index 5 holds a NaN: it is consumed by step 6.
  with pytest.raises(
    loop.TrainingDiverged, match="not finite at step 6 .*last good checkpoint: step 4"
  ):
    _run(str(tmp_path), nan_at_batch=5)
  assert Checkpointer(str(tmp_path / "ckpt")).steps() == [4]


def test_warmup_linear_schedule_by_hand():
  s = optim.warmup_linear_schedule(1.0, total_steps=10, warmup_steps=2, end_fraction=0.0)
  np.testing.assert_allclose([s(0), s(1), s(2), s(6), s(10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_flipped_bytes_in_latest_checkpoint_fall_back_with_a_warning(tmp_path, caplog):
  # Same size, changed contents. Random weights do not compress, so orbax stores them raw and
  # alone restores the damaged leaf silently (checked below on a copy without the record).
  rng = np.random.default_rng(0)
  states = {step: {"w": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)} for step in (1, 2)}
  directory = tmp_path / "ckpt"
  ckpt = Checkpointer(str(directory), async_save=True)
  for step, state in states.items():
    ckpt.save(step, state)
  ckpt.close()
  damaged = largest_file(directory / "2")
  flip_bytes(damaged)
  abstract = jax.eval_shape(lambda: states[1])
  unchecked = tmp_path / "unchecked"
  shutil.copytree(directory, unchecked)
  os.remove(unchecked / "2" / checksums.NAME)
  step, state, _ = Checkpointer(str(unchecked)).restore_latest_good(abstract)
  assert step == 2 and not np.array_equal(state["w"], states[2]["w"])  # the silent load
  with caplog.at_level(logging.WARNING):
    step, state, _ = Checkpointer(str(directory)).restore_latest_good(abstract)
  assert step == 1
  np.testing.assert_array_equal(state["w"], states[1]["w"])
  assert "cannot be restored" in caplog.text and "does not match its checksum" in caplog.text
  assert os.path.basename(damaged) in caplog.text


def test_async_checkpoints_get_checksums_once_committed(tmp_path):
  schedule, tx = _optimizer()
  state = loop.create_state({"w": jnp.ones((3,)), "b": jnp.zeros(())}, tx)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2, async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, state)
  ckpt.close()
  # Step 1 was removed by keep=2; the kept ones, including the last, carry their record.
  assert ckpt.steps() == [2, 3]
  for step in (2, 3):
    assert checksums.verify(str(tmp_path / "ckpt" / str(step))) == ""
