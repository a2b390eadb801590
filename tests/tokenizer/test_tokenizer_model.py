"""RQ-VAE module and losses: architecture, initialisation, hand-computed loss values."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avg_jax.errors import UserError
from avg_jax.tokenizer import losses, quantizer
from avg_jax.tokenizer.model import MLP, RQVAE, ByteDropout, RQVAEConfig


def _cfg(**kw):
  base = dict(in_dim=12, e_dim=6, hidden_dims=(16, 8), codebook_size=5, num_levels=3)
  return RQVAEConfig(**dict(base, **kw))


def test_parameter_shapes_and_logical_axes():
  model = RQVAE(_cfg(shared_codebook=False))
  # Shapes and logical names only: traced, not computed (eager init compiled ~100 programs).
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((4, 12)), train=False))
  params = variables["params"]
  shapes = jax.tree.map(lambda p: p.value.shape, params, is_leaf=lambda p: hasattr(p, "names"))
  assert shapes["codebooks"] == (3, 5, 6)
  assert [shapes["encoder"][f"dense_{i}"]["kernel"] for i in range(3)] == [
    (12, 16),
    (16, 8),
    (8, 6),
  ]
  assert [shapes["decoder"][f"dense_{i}"]["kernel"] for i in range(3)] == [
    (6, 8),
    (8, 16),
    (16, 12),
  ]
  # BatchNorm after hidden layers only (last_layer_batchnorm=False), as LC-Rec's MLPLayers.
  assert sorted(k for k in shapes["encoder"] if k.startswith("norm")) == ["norm_0", "norm_1"]
  assert params["codebooks"].names == ("levels", "codebook", "code_dim")
  assert params["encoder"]["dense_0"]["kernel"].names == ("embed", "mlp")
  with_bn = jax.eval_shape(
    lambda: RQVAE(_cfg(last_layer_batchnorm=True)).init(
      jax.random.key(0), jnp.zeros((4, 12)), train=False
    )
  )
  assert "norm_2" in with_bn["params"]["encoder"]


def test_xavier_normal_kernels_and_zero_biases():
  model = MLP((512,), dropout=0.0)
  params = jax.tree.map(
    lambda p: getattr(p, "value", p),
    model.init(jax.random.key(1), jnp.zeros((2, 256)), train=False)["params"],
    is_leaf=lambda p: hasattr(p, "names"),
  )
  kernel = np.asarray(params["dense_0"]["kernel"])
  # torch.nn.init.xavier_normal_: std = sqrt(2 / (fan_in + fan_out)), untruncated.
  assert kernel.std() == pytest.approx(np.sqrt(2 / (256 + 512)), rel=0.02)
  assert np.abs(kernel).max() > 2.5 * np.sqrt(2 / (256 + 512))  # tails are not truncated
  np.testing.assert_array_equal(np.asarray(params["dense_0"]["bias"]), 0.0)


def test_mlp_layer_order_matches_hand_forward():
  # Dense -> BatchNorm (batch statistics in train mode) -> ReLU, then Dense with nothing after.
  model = MLP((8, 4), dropout=0.0)
  x = jax.random.normal(jax.random.key(2), (64, 3))
  variables = model.init(jax.random.key(3), x, train=False)
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  p = jax.tree.map(
    lambda v: np.asarray(getattr(v, "value", v)),
    variables["params"],
    is_leaf=lambda v: hasattr(v, "names"),
  )
  h = np.asarray(x) @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["norm_0"]["scale"] + p["norm_0"]["bias"]
  h = np.maximum(h, 0.0)
  expected = h @ p["dense_1"]["kernel"] + p["dense_1"]["bias"]
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
  assert (expected < 0).any()  # no ReLU at the end


def test_forward_outputs_and_eval_is_deterministic():
  cfg = _cfg()
  model = RQVAE(cfg)
  x = jax.random.normal(jax.random.key(4), (10, 12))
  variables = model.init(jax.random.key(5), x, train=False)
  out = model.apply(variables, x, train=False)
  assert out["latent"].shape == (10, 6) and out["decoded"].shape == (10, 12)
  assert out["rq"].codes.shape == (10, 3)
  np.testing.assert_array_equal(
    np.asarray(model.apply(variables, x, method=RQVAE.codes)), np.asarray(out["rq"].codes)
  )
  again = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(np.asarray(again["decoded"]), np.asarray(out["decoded"]))
  # Train mode applies dropout: two dropout keys give different outputs.
  a, _ = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"]
  )
  b, _ = model.apply(
    variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]
  )
  assert not np.allclose(np.asarray(a["decoded"]), np.asarray(b["decoded"]))


def test_mse_and_infonce_hand_values():
  a = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  b = jnp.array([[0.0, 0.0], [0.0, 1.0]])
  assert float(losses.mse(a, b)) == pytest.approx((1 + 0 + 0 + 1) / 4)
  # Unit vectors: a = e1, e2; b = e1, (e1 + e2)/sqrt2; temperature 1.
  a = jnp.array([[1.0, 0.0], [0.0, 3.0]])
  b = jnp.array([[2.0, 0.0], [1.0, 1.0]])
  s = 1 / np.sqrt(2)
  logits = np.array([[1.0, s], [0.0, s]])

  def ce(row, i):
    return -(row[i] - np.log(np.exp(row).sum()))

  forward = (ce(logits[0], 0) + ce(logits[1], 1)) / 2
  backward = (ce(logits.T[0], 0) + ce(logits.T[1], 1)) / 2
  assert float(losses.infonce(a, b, 1.0)) == pytest.approx((forward + backward) / 2, rel=1e-6)


def test_total_loss_weights_and_positions():
  rq = quantizer.RQOutput(
    quantized=None, codes=None, quant_loss=jnp.array(0.5), residuals=None, errors=None
  )
  outputs = dict(decoded=jnp.array([[1.0, 1.0]]), latent=jnp.array([[3.0, 3.0]]), rq=rq)
  image, caption = jnp.array([[0.0, 1.0]]), jnp.array([[1.0, 3.0]])
  w = losses.LossWeights(quant=2.0, recon=3.0, align=5.0)
  total, parts = losses.total_loss(outputs, image, caption, w)
  # recon = (1 + 0) / 2 = 0.5; align (decoder) = (0 + 4) / 2 = 2; total = 1 + 1.5 + 10.
  assert float(parts["recon_loss"]) == pytest.approx(0.5)
  assert float(parts["align_loss"]) == pytest.approx(2.0)
  assert float(total) == pytest.approx(12.5)
  w = losses.LossWeights(align_position="latent")
  _, parts = losses.total_loss(outputs, image, caption, w)
  assert float(parts["align_loss"]) == pytest.approx((4 + 0) / 2)


def test_loss_weights_from_config():
  tok = ml_collections.ConfigDict(
    dict(
      quant_weight=1.0,
      recon_weight=1.0,
      align_weight=0.7,
      align_loss="mse",
      align_position="decoder",
      infonce_temperature=0.07,
    )
  )
  assert losses.LossWeights.from_config(tok, "avg").align == 0.7
  assert losses.LossWeights.from_config(tok, "rq").align == 0.0  # the ablation
  tok.align_loss = "cosine"
  with pytest.raises(UserError, match="align_loss"):
    losses.LossWeights.from_config(tok, "avg")


def test_byte_dropout_rate_scaling_and_shape():
  x = jnp.ones((64, 1001))  # width not a multiple of 4
  drop = ByteDropout(0.25)
  a = np.asarray(drop.apply({}, x, rngs={"dropout": jax.random.key(0)}))
  b = np.asarray(drop.apply({}, x, rngs={"dropout": jax.random.key(1)}))
  assert a.shape == (64, 1001)
  assert set(np.unique(a)) == {0.0, np.float32(4 / 3)}  # kept units scaled by 1 / 0.75
  assert abs((a == 0).mean() - 0.25) < 0.01  # 64064 draws: sd 0.0017
  assert not np.array_equal(a, b)
  assert (a[:, -3:] == 0).any() and (a[:, -3:] != 0).any()  # the tail bytes are random too
  np.testing.assert_array_equal(
    np.asarray(ByteDropout(0.25, deterministic=True).apply({}, x)), np.asarray(x)
  )
  assert ByteDropout.threshold(0.25) == 64 and ByteDropout.threshold(0.1) == 26
