"""InfoNCE against hand-computed values, the learned temperature, and the sharded train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax import partitioning
from avg_jax.encoders import clip, contrastive

# Row i = image i, column j = text j. exp(logits) rows: [2, 3, 1], [1, 1, 4], [1, 2, 5].
LOGITS = np.log(np.array([[2.0, 3.0, 1.0], [1.0, 1.0, 4.0], [1.0, 2.0, 5.0]]))


def test_infonce_hand_computed():
  # image->text: ln(6/2), ln(6/1), ln(8/5); text->image: ln(4/2), ln(6/1), ln(10/5).
  expected = (math.log(3 * 6 * 1.6) / 3 + math.log(2 * 6 * 2) / 3) / 2  # = ln(691.2) / 6
  got = float(contrastive.symmetric_infonce(jnp.asarray(LOGITS)))
  assert got == pytest.approx(expected, rel=1e-6)
  assert expected == pytest.approx(math.log(691.2) / 6, rel=1e-12)


def test_infonce_masks_other_captions_of_the_same_image():
  # Pairs 0 and 1 show the same image: entries (0, 1) and (1, 0) are not negatives.
  same = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
  # image->text: ln(3/2), ln(5/1), ln(8/5); text->image: ln(3/2), ln(3/1), ln(10/5).
  expected = (math.log(1.5 * 5 * 1.6) / 3 + math.log(1.5 * 3 * 2) / 3) / 2
  got = float(contrastive.symmetric_infonce(jnp.asarray(LOGITS), jnp.asarray(same)))
  assert got == pytest.approx(expected, rel=1e-6)


def test_clip_logits_normalise_and_clamp_the_scale():
  image = jnp.array([[3.0, 4.0], [0.0, 2.0]])
  text = jnp.array([[6.0, 8.0], [1.0, 0.0]])
  logits = contrastive.clip_logits(image, text, jnp.log(10.0))
  np.testing.assert_allclose(logits, [[10.0, 6.0], [8.0, 0.0]], atol=1e-5)
  clamped = contrastive.clip_logits(image, text, jnp.asarray(9.0))  # e^9 > 100
  np.testing.assert_allclose(clamped, [[100.0, 60.0], [80.0, 0.0]], atol=1e-4)


def test_schedule_warmup_then_cosine():
  schedule = contrastive.learning_rate_schedule(
    dict(steps=100, warmup_steps=10, learning_rate=1e-3)
  )
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(5e-4)
  assert float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(55)) == pytest.approx(5e-4, rel=1e-4)  # half way down the cosine
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


TINY = clip.ClipConfig(
  image_size=16,
  patch_size=8,
  vision_width=16,
  vision_layers=1,
  vision_heads=2,
  vision_mlp_dim=32,
  vocab_size=40,
  max_text_length=8,
  text_width=16,
  text_layers=1,
  text_heads=2,
  text_mlp_dim=32,
  projection_dim=8,
  eos_token_id=1,
  pad_token_id=0,
)
TRAIN = dict(steps=30, warmup_steps=2, learning_rate=3e-3, weight_decay=1e-4)


def _batch(rng, size=16):
  tokens = rng.integers(3, 40, size=(size, 8)).astype(np.int32)
  lengths = rng.integers(2, 8, size=size)
  for row, n in enumerate(lengths):
    tokens[row, n] = 1  # EOS
    tokens[row, n + 1 :] = 0
  return dict(
    image=rng.integers(0, 256, size=(size, 16, 16, 3)).astype(np.uint8),
    tokens=tokens,
    image_id=np.arange(size, dtype=np.int64),
  )


def test_train_step_sharded_over_8_devices_fits_a_batch():
  mesh = partitioning.make_mesh({"data": 4, "fsdp": 2, "model": 1})
  tx = contrastive.make_optimizer(TRAIN)
  state, shardings = contrastive.create_train_state(TINY, tx, mesh, jax.random.key(0))
  kernel = state.params["vision"]["block_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
  step = contrastive.make_train_step(
    TINY, tx, contrastive.learning_rate_schedule(TRAIN), mesh, shardings
  )
  batch = partitioning.shard_host_batch(_batch(np.random.default_rng(0)), mesh)
  # Jitted: op by op, each primitive on 8 sharded devices would compile on its own.
  initial_loss = float(
    jax.jit(contrastive.loss_and_metrics, static_argnums=1)(state.params, TINY, batch)[0]
  )
  old_params = state.params
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(initial_loss, rel=1e-5)  # metrics of the pre-update params
  assert old_params["logit_scale"].is_deleted()  # the state was donated
  assert int(state.step) == 25
  assert losses[-1] < 0.5 * losses[0], losses
  assert state.params["vision"]["block_0"]["mlp"]["fc1"]["kernel"].sharding == kernel.sharding
