"""RQ-VAE training: batches, sharded step == single-device step, k-means init, restarts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CompileCounter

from avg_jax import partitioning
from avg_jax.errors import UserError
from avg_jax.tokenizer import losses, quantizer, train
from avg_jax.tokenizer.model import RQVAE, RQVAEConfig

CFG = RQVAEConfig(
  in_dim=16, e_dim=8, hidden_dims=(32, 16), codebook_size=8, num_levels=2, dropout=0.25
)
# Every 8-device trainer here runs on the mesh the sharded-step test compares with one device
# (data parallel and model parallel at once): equal trainer settings on one mesh share their
# compiled programs (init, k-means, step, encoding) across the tests instead of compiling
# them again for a data-only mesh.
MESH = {"data": 4, "model": 2}


def _data(n_images=64, dim=16, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n_images, dim)).astype(np.float32)
  index = np.repeat(np.arange(n_images), 5)
  captions = images[index] + 0.3 * rng.normal(size=(len(index), dim)).astype(np.float32)
  return images, captions, index


def test_pair_sampler_is_a_function_of_seed_and_step():
  images, captions, index = _data(n_images=10)
  a = train.PairSampler(images, captions, index, batch_size=8, seed=3)
  b = train.PairSampler(images, captions, index, batch_size=8, seed=3)
  assert a.steps_per_epoch == 6  # 50 pairs // 8, remainder dropped
  epoch = np.concatenate([a.indices(s) for s in range(6)])
  assert len(np.unique(epoch)) == 48  # no pair twice within an epoch
  np.testing.assert_array_equal(b.indices(7), a.indices(7))  # order of calls does not matter
  np.testing.assert_array_equal(b.indices(2), a.indices(2))
  assert not np.array_equal(a.indices(0), a.indices(6))  # reshuffled next epoch
  imgs, caps = a.batch(0)
  np.testing.assert_array_equal(imgs, images[index[a.indices(0)]])
  np.testing.assert_array_equal(caps, captions[a.indices(0)])
  with pytest.raises(UserError, match="batch_size"):
    train.PairSampler(images, captions, index, batch_size=64, seed=0)


def _trainer(mesh, **options):
  return train.RQVAETrainer(
    CFG,
    losses.LossWeights(),
    mesh,
    train.TrainOptions(learning_rate=1e-3, **options),
    batch_size=32,
  )


def _run(trainer, sampler, steps):
  state = trainer.init_state()
  state = trainer.kmeans_init(state, sampler.batch(0)[0])
  history = []
  for step in range(steps):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    history.append(jax.tree.map(np.asarray, metrics))
  return state, history


def test_trainers_with_equal_settings_share_their_programs():
  # A stage rerun (or a second tokenizer in one process) builds a new trainer: its init, k-means
  # latents, step and encoding are the first one's programs, not compiled again.
  images, captions, index = _data()
  sampler = train.PairSampler(images, captions, index, batch_size=32, seed=0)
  mesh = partitioning.make_mesh(MESH)
  first, _ = _run(_trainer(mesh), sampler, 2)
  _trainer(mesh).encode_images(first, images)
  with CompileCounter() as compiles:
    again, _ = _run(_trainer(mesh), sampler, 2)
    _trainer(mesh).encode_images(again, images)
  assert compiles.count == 0
  # Other settings are another program.
  with CompileCounter() as compiles:
    _run(_trainer(mesh, dead_code_after=1), sampler, 1)
  assert compiles.count >= 1


def test_sharded_step_equals_single_device_step():
  images, captions, index = _data()
  sampler = train.PairSampler(images, captions, index, batch_size=32, seed=0)
  one = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  many = partitioning.make_mesh(MESH)
  state_1, hist_1 = _run(_trainer(one), sampler, 3)
  state_8, hist_8 = _run(_trainer(many), sampler, 3)
  for key in ("loss", "recon_loss", "align_loss", "quant_loss"):
    np.testing.assert_allclose([h[key] for h in hist_8], [h[key] for h in hist_1], rtol=2e-4)
  np.testing.assert_allclose(
    np.asarray(state_8.params["codebooks"]),
    np.asarray(state_1.params["codebooks"]),
    rtol=2e-3,
    atol=2e-5,
  )
  spec = state_8.params["encoder"]["dense_0"]["kernel"].sharding.spec
  assert tuple(spec) == ("fsdp", "model")  # created sharded as annotated
  assert tuple(state_8.params["codebooks"].sharding.spec) in ((), (None, None, None))


def test_training_lowers_the_loss_and_kmeans_init_fits_latents():
  images, captions, index = _data(n_images=128)
  sampler = train.PairSampler(images, captions, index, batch_size=32, seed=0)
  trainer = _trainer(partitioning.make_mesh(MESH))
  fresh = trainer.init_state()
  initialised = trainer.kmeans_init(fresh, sampler.batch(0)[0])
  latents = trainer._init_latents(initialised, sampler.batch(0)[0])
  # Jitted: op by op, each primitive on the sharded arrays would compile a program of its own.
  mean_error = jax.jit(lambda x, c: jnp.mean(quantizer.residual_quantize(x, c, 1).errors))
  err = lambda st: float(mean_error(latents, st.params["codebooks"]))
  assert err(initialised) < 0.5 * err(fresh)  # k-means beats the small uniform init
  state = initialised
  losses_seen = []
  for step in range(60):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    losses_seen.append(float(metrics["loss"]))
  assert np.mean(losses_seen[-10:]) < 0.9 * np.mean(losses_seen[:10])
  assert int(state.step) == 60


def test_dead_code_restart_runs_inside_the_step():
  images, captions, index = _data()
  sampler = train.PairSampler(images, captions, index, batch_size=32, seed=0)
  trainer = _trainer(partitioning.make_mesh(MESH), dead_code_after=1)
  state = trainer.init_state()  # no k-means: most of the tiny uniform codewords go unused
  state, metrics = trainer.train_step(state, *sampler.batch(0))
  assert int(metrics["restarted_codes"]) > 0
  assert (np.asarray(state.last_used) == 1).all()  # used or restarted at step 1


def test_encode_images_pads_and_matches_the_model():
  images, _, _ = _data(n_images=37)
  trainer = _trainer(partitioning.make_mesh(MESH))
  state = trainer.init_state()
  codes, decoded, latent = trainer.encode_images(state, images, batch_size=16)
  assert codes.shape == (37, 2) and decoded.shape == (37, 16) and latent.shape == (37, 8)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  # The model applied to all rows at once (jitted: one program instead of one per primitive).
  expected = jax.jit(lambda v, x: RQVAE(CFG).apply(v, x, method=RQVAE.codes))(variables, images)
  np.testing.assert_array_equal(codes, np.asarray(expected))


def test_infonce_alignment_on_the_latent_is_wired_into_the_step():
  cfg = RQVAEConfig(
    in_dim=16, e_dim=16, hidden_dims=(32,), codebook_size=8, num_levels=2, dropout=0.0
  )
  weights = losses.LossWeights(align_loss="infonce", align_position="latent", temperature=0.5)
  mesh = partitioning.make_mesh(MESH)
  trainer = train.RQVAETrainer(cfg, weights, mesh, train.TrainOptions(), batch_size=32)
  images, captions, index = _data()
  sampler = train.PairSampler(images, captions, index, batch_size=32, seed=0)
  state = trainer.init_state()
  imgs, caps = sampler.batch(0)
  variables = {"params": state.params, "batch_stats": state.batch_stats}

  @jax.jit  # one program instead of one per primitive
  def align_loss(variables, imgs, caps):
    latent, _ = RQVAE(cfg).apply(
      variables, imgs, train=True, method=RQVAE.encode, mutable=["batch_stats"]
    )
    return losses.infonce(latent, caps, 0.5)

  expected = float(align_loss(variables, imgs, caps))
  _, metrics = trainer.train_step(state, imgs, caps)
  assert float(metrics["align_loss"]) == pytest.approx(expected, rel=1e-4)
