"""The decode path: cached single steps equal the teacher-forced forward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax.models import t5

TOL = 1e-5

# Compiled once per config: eager flax applies dispatch op by op and are slow.
_logits = jax.jit(t5.logits, static_argnums=1, static_argnames=("deterministic",))
_encode = jax.jit(t5.encode, static_argnums=1)
_init_state = jax.jit(t5.init_decode_state, static_argnums=(1, 4))
_step = jax.jit(t5.decode_step, static_argnums=1, static_argnames=("voken_logits_only",))
_score = jax.jit(t5.score, static_argnums=1)
_loss = jax.jit(t5.cross_entropy_loss, static_argnums=1)
_candidates = jax.jit(t5.candidate_logits, static_argnums=1)


def _cfg(variant, **kw):
  base = dict(
    vocab_size=40,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_heads=2,
    num_encoder_layers=1,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=6,
    num_voken_tokens=14,
    dropout_rate=0.3,
  )
  if variant == "v1_1":
    base.update(feed_forward="gated-gelu", tie_embeddings=False)
  base.update(kw)
  return t5.T5Config(**base)


def _params(cfg, seed=0):
  return _random_params(cfg, seed)


def _random_params(cfg, seed):
  """Random params from the abstract shapes with numpy: no compiled init (slow on CPU)."""
  abstract = nn.unbox(t5.abstract_variables(cfg))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    return 1.0 + 0.1 * x if path[-1].key == "scale" else 0.5 * x

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _batch():
  inputs = np.array(
    [[5, 6, 7, 8, 1, 0, 0], [9, 10, 1, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 1]], np.int32
  )
  # Voken targets (ids 26..39) then EOS; length 6 > max_distance-ish to use log buckets.
  targets = np.array(
    [[26, 30, 35, 39, 27, 1], [28, 28, 33, 38, 1, 0], [39, 26, 29, 31, 36, 1]], np.int32
  )
  return inputs, targets


def _decode_all(params, cfg, inputs, targets, max_len, voken_only):
  encoded = _encode(params, cfg, inputs)
  cache = _init_state(params, cfg, encoded, inputs, max_len)
  step = functools.partial(_step, voken_logits_only=voken_only)
  token = jnp.zeros((inputs.shape[0],), jnp.int32)
  outs = []
  for i in range(targets.shape[1]):
    out, cache = step(params, cfg, token, cache)
    outs.append(out)
    token = jnp.asarray(targets[:, i])
  return jnp.stack(outs, axis=1), cache


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
@pytest.mark.parametrize("scan", [False, True])
def test_cached_steps_equal_full_forward(variant, scan):
  cfg = _cfg(variant, scan_layers=scan)
  params = _params(cfg)
  inputs, targets = _batch()
  full = _logits(params, cfg, inputs, targets)
  # A cache longer than the target: unused positions must stay invisible.
  stepped, cache = _decode_all(params, cfg, inputs, targets, targets.shape[1] + 2, False)
  np.testing.assert_allclose(stepped, full, atol=TOL, rtol=0)
  np.testing.assert_array_equal(cache["index"], [6, 6, 6])


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_voken_logits_only_is_the_matching_slice(variant):
  cfg = _cfg(variant)
  params = _params(cfg, seed=1)
  inputs, targets = _batch()
  full, _ = _decode_all(params, cfg, inputs, targets, 6, False)
  vok, _ = _decode_all(params, cfg, inputs, targets, 6, True)
  columns = t5.voken_logit_token_ids(cfg)
  np.testing.assert_array_equal(columns[:3], [1, 26, 27])
  assert vok.shape == (3, 6, 1 + cfg.num_voken_tokens) and columns[-1] == 39
  np.testing.assert_allclose(vok, np.asarray(full)[..., columns], atol=TOL, rtol=0)


def test_voken_column_mapping_roundtrip():
  cfg = _cfg("v1_0")
  ids = t5.voken_logit_token_ids(cfg)
  np.testing.assert_array_equal(t5.tokens_to_voken_columns(cfg, ids), np.arange(len(ids)))
  np.testing.assert_array_equal(t5.tokens_to_voken_columns(cfg, [0, 2, 25]), [-1, -1, -1])


def test_cache_layout_and_beam_reordering():
  """Every cache leaf has leading dim batch; gathering rows reorders later steps' outputs."""
  cfg = _cfg("v1_0")
  params = _params(cfg, seed=2)
  inputs, targets = _batch()
  encoded = _encode(params, cfg, inputs)
  cache = _init_state(params, cfg, encoded, inputs, 6)
  assert cache["self_k"].shape == (3, 2, 6, 2, 4)
  assert cache["cross_k"].shape == (3, 2, 7, 2, 4)
  assert all(x.shape[0] == 3 for x in jax.tree.leaves(cache))
  token = jnp.zeros((3,), jnp.int32)
  _, cache = _step(params, cfg, token, cache)
  _, cache = _step(params, cfg, jnp.asarray(targets[:, 0]), cache)
  order = jnp.array([2, 0, 0])
  reordered = jax.tree.map(lambda x: x[order], cache)
  out_a, _ = _step(params, cfg, jnp.asarray(targets[:, 1]), cache)
  out_b, _ = _step(params, cfg, jnp.asarray(targets[:, 1])[order], reordered)
  np.testing.assert_allclose(out_b, np.asarray(out_a)[np.array([2, 0, 0])], atol=1e-6)


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
@pytest.mark.parametrize("scan", [False, True])
def test_candidate_logits_equal_each_pair_alone(variant, scan):
  """n targets per input packed into one decoder sequence (one encoder pass) give the logits
  of teacher forcing each (input, target) pair on its own: no attention across segments."""
  cfg = _cfg(variant, scan_layers=scan)
  params = _params(cfg, seed=6)
  inputs, targets = _batch()
  # Four targets per input: each row's own, the others' (one with padding), one reversed.
  cands = np.stack(
    [targets, np.roll(targets, 1, axis=0), np.roll(targets, 2, axis=0), targets[::-1]], axis=1
  )  # [3, 4, 6]
  packed = np.asarray(_candidates(params, cfg, inputs, cands))
  assert packed.shape == (3, 4, 6, cfg.vocab_size)
  for j in range(4):
    alone = _logits(params, cfg, inputs, cands[:, j])
    np.testing.assert_allclose(packed[:, j], alone, atol=TOL, rtol=0)


def test_score_is_sum_of_token_log_probs():
  cfg = _cfg("v1_1")
  params = _params(cfg, seed=3)
  inputs, targets = _batch()
  out = np.asarray(_logits(params, cfg, inputs, targets), np.float64)
  lp = out - np.log(np.exp(out).sum(-1, keepdims=True))
  want = [sum(lp[b, i, targets[b, i]] for i in range(6) if targets[b, i]) for b in range(3)]
  np.testing.assert_allclose(_score(params, cfg, inputs, targets), want, atol=1e-5)
  loss, num = _loss(params, cfg, inputs, targets)
  assert num == 17
  np.testing.assert_allclose(loss, -sum(want) / 17, rtol=1e-5)


def test_dropout_is_active_only_when_asked():
  cfg = _cfg("v1_0")
  params = _params(cfg, seed=4)
  inputs, targets = _batch()
  a = _logits(params, cfg, inputs, targets)
  b = _logits(
    params, cfg, inputs, targets, deterministic=False, rngs={"dropout": jax.random.key(1)}
  )
  c = _logits(
    params, cfg, inputs, targets, deterministic=False, rngs={"dropout": jax.random.key(1)}
  )
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_array_equal(b, c)


def test_bfloat16_compute_is_close_to_float32():
  cfg = _cfg("v1_1")
  # The model's own init: T5 keeps attention logits O(1) through the query init scale; the
  # cruder random params of the other tests give attention logits of ~10, where bf16
  # rounding of queries/keys is amplified by the softmax.
  params = t5.init_params(cfg, jax.random.key(5))
  inputs, targets = _batch()
  ref = _logits(params, cfg, inputs, targets)
  low = _logits(params, cfg.replace(dtype="bfloat16"), inputs, targets)
  assert low.dtype == jnp.float32
  # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4%); over three residual blocks
  # per layer the error stays within a few percent of the logits' scale. A float32-only bug
  # (e.g. a missing cast) would give errors of the order of the scale itself.
  scale = np.abs(np.asarray(ref)).max()
  err = np.abs(np.asarray(low) - np.asarray(ref)).max()
  assert 0 < err < 0.05 * scale, (err, scale)
  encoded = _encode(params, cfg.replace(dtype="bfloat16"), inputs)
  assert encoded.dtype == jnp.bfloat16
