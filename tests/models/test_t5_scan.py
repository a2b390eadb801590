"""nn.scan and nn.remat over layers compute the same function as the plain layer stack."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from avg_jax.models import t5


def _setup(variant):
  kw = dict(
    vocab_size=30,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_heads=2,
    num_encoder_layers=2,
    num_decoder_layers=2,
    num_voken_tokens=8,
    dropout_rate=0.0,
  )
  if variant == "v1_1":
    kw.update(feed_forward="gated-gelu", tie_embeddings=False)
  cfg = t5.T5Config(**kw)
  params = _random_params(cfg, 7)
  inputs = np.array([[4, 5, 6, 1, 0], [7, 8, 9, 10, 1]], np.int32)
  targets = np.array([[22, 25, 29, 1], [23, 24, 1, 0]], np.int32)
  return cfg, params, inputs, targets


def _random_params(cfg, seed):
  """Random params from the abstract shapes with numpy: no compiled init (slow on CPU)."""
  abstract = nn.unbox(t5.abstract_variables(cfg))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * x if path[-1].key == "scale" else 0.5 * x

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _outputs(cfg, params, inputs, targets):
  """(loss, grads, logits), one compiled program."""

  def fn(p):
    loss, grads = jax.value_and_grad(lambda q: t5.cross_entropy_loss(q, cfg, inputs, targets)[0])(p)
    return loss, grads, t5.logits(p, cfg, inputs, targets)

  return jax.jit(fn)(params)


@functools.cache
def _baseline(variant):
  cfg, params, inputs, targets = _setup(variant)
  return _outputs(cfg, params, inputs, targets)


def test_stack_unstack_roundtrip():
  cfg, params, _, _ = _setup("v1_0")
  stacked = t5.stack_layer_params(params)
  assert stacked["encoder"]["layers"]["mlp"]["wi"].shape == (2, 16, 24)
  assert "layers_0" not in stacked["decoder"]
  back = t5.unstack_layer_params(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_scanned_init_has_the_stacked_structure():
  cfg, params, _, _ = _setup("v1_1")
  scanned = nn.unbox(t5.abstract_variables(cfg.replace(scan_layers=True)))["params"]
  want = jax.tree.map(np.shape, t5.stack_layer_params(params))
  assert jax.tree.map(np.shape, scanned) == want


# Each case compiles a forward+backward program (the slow part on CPU): cover remat alone,
# scan alone and both together across the two architectures rather than every combination.
@pytest.mark.parametrize(
  "variant,scan,remat", [("v1_0", False, True), ("v1_0", True, True), ("v1_1", True, False)]
)
def test_same_outputs_and_gradients(variant, scan, remat):
  cfg, params, inputs, targets = _setup(variant)
  loss, grads, logits = _baseline(variant)
  other_cfg = cfg.replace(scan_layers=scan, remat=remat)
  other_params = t5.stack_layer_params(params) if scan else params
  other_loss, other_grads, other_logits = _outputs(other_cfg, other_params, inputs, targets)
  np.testing.assert_allclose(other_logits, logits, atol=1e-6, rtol=0)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  if scan:
    other_grads = t5.unstack_layer_params(other_grads)
  for path, a in jax.tree_util.tree_leaves_with_path(grads):
    b = other_grads
    for key in path:
      b = b[key.key]
    # Float32 summation order differs (e.g. the shared position-bias gradient is summed
    # over layers inside vs outside the scan): compare relative to each tensor's scale.
    scale = float(np.abs(a).max())
    np.testing.assert_allclose(b, a, atol=1e-5 * scale, rtol=0, err_msg=str(path))
