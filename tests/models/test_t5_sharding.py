"""Logical partitioning of every T5 parameter on a (data=4, model=2) mesh of fake devices,
and a sharded jitted training step whose loss decreases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from avg_jax import partitioning
from avg_jax.models import t5

# Mesh axes per parameter kind with the default rules (embed -> fsdp, heads/mlp/vocab -> model).
ATTENTION = {
  "query": ("fsdp", "model", None),
  "key": ("fsdp", "model", None),
  "value": ("fsdp", "model", None),
  "out": ("model", None, "fsdp"),
}
NORM = {"scale": ("fsdp",)}


def _cfg(**kw):
  base = dict(
    vocab_size=48,
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_heads=2,
    # One layer per stack where programs are compiled: every layer is the same code under the
    # same rules, and the unrolled init's compile grows with the layers (the spec test, which
    # compiles nothing, checks two).
    num_encoder_layers=1,
    num_decoder_layers=1,
    num_voken_tokens=16,
    dropout_rate=0.0,
    feed_forward="gated-gelu",
    tie_embeddings=False,
  )
  base.update(kw)
  return t5.T5Config(**base)


def _mesh():
  assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices"
  return partitioning.make_mesh({"data": 4, "fsdp": 1, "model": 2})


def _expected_layer(decoder: bool):
  mlp = {"wi_0": ("fsdp", "model"), "wi_1": ("fsdp", "model"), "wo": ("model", "fsdp")}
  if decoder:
    return {
      "self_attention": ATTENTION,
      "cross_attention": ATTENTION,
      "pre_self_attention_norm": NORM,
      "pre_cross_attention_norm": NORM,
      "pre_mlp_norm": NORM,
      "mlp": mlp,
    }
  return {"attention": ATTENTION, "pre_attention_norm": NORM, "pre_mlp_norm": NORM, "mlp": mlp}


def _expected(scan: bool):
  def stack(decoder):
    tree = {"relpos_bias": {"rel_embedding": (None, "model")}, "final_norm": NORM}
    if scan:  # the scanned "layers" axis is replicated
      tree["layers"] = jax.tree.map(
        lambda s: (None,) + s, _expected_layer(decoder), is_leaf=lambda x: isinstance(x, tuple)
      )
    else:
      for i in range(2):
        tree[f"layers_{i}"] = _expected_layer(decoder)
    return tree

  return {
    "token_embedding": ("model", "fsdp"),
    "output_embedding": ("model", "fsdp"),
    "encoder": stack(False),
    "decoder": stack(True),
  }


def _normalise(spec):
  spec = tuple(spec)
  while spec and spec[-1] is None:
    spec = spec[:-1]
  return spec


@pytest.mark.parametrize("scan", [False, True])
def test_partition_spec_of_every_parameter(scan):
  cfg = _cfg(scan_layers=scan, num_encoder_layers=2, num_decoder_layers=2)
  specs = partitioning.param_specs(t5.abstract_variables(cfg), _mesh())["params"]
  got = jax.tree.map(_normalise, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  want = jax.tree.map(_normalise, _expected(scan), is_leaf=lambda x: isinstance(x, tuple))
  assert got == want


def _batch():
  rng = np.random.default_rng(0)
  inputs = rng.integers(3, 32, size=(8, 6)).astype(np.int32)
  inputs[:, -1] = 1
  inputs[:3, 4:] = 0
  targets = rng.integers(32, 48, size=(8, 4)).astype(np.int32)
  targets[:, -1] = 1
  return inputs, targets


def test_sharded_forward_equals_single_device():
  cfg = _cfg()
  mesh = _mesh()
  variables, shardings = partitioning.sharded_init(
    t5.init_variables, mesh, jax.random.key(0), static=(cfg,)
  )
  params = variables["params"]
  assert params["token_embedding"].sharding.spec == shardings["params"]["token_embedding"].spec
  assert len(params["token_embedding"].addressable_shards) == 8
  inputs, targets = _batch()
  batch_sharding = partitioning.logical_sharding(mesh, "batch", "length")
  inputs_s, targets_s = (jax.device_put(x, batch_sharding) for x in (inputs, targets))
  with partitioning.activation_context(mesh):
    fn = jax.jit(
      lambda p, i, t: t5.logits(p, cfg, i, t),
      in_shardings=(shardings["params"], batch_sharding, batch_sharding),
      out_shardings=partitioning.logical_sharding(mesh, "batch", "length", "vocab"),
    )
    sharded = fn(params, inputs_s, targets_s)
  local = jax.device_get(params)
  single = jax.jit(lambda p: t5.logits(p, cfg, inputs, targets))(local)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_training_loss_decreases_with_donated_sharded_state(scan):
  cfg = _cfg(scan_layers=scan, remat=scan)
  mesh = _mesh()
  variables, shardings = partitioning.sharded_init(
    t5.init_variables, mesh, jax.random.key(1), static=(cfg,)
  )
  params, param_shardings = variables["params"], shardings["params"]
  tx = optax.adam(1e-2)
  with partitioning.activation_context(mesh):
    opt_state = jax.jit(tx.init)(params)
  state = (params, opt_state)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = partitioning.logical_sharding(mesh, "batch", "length")

  def train_step(state, inputs, targets, rng):
    params, opt_state = state

    def loss_fn(p):
      return t5.cross_entropy_loss(
        p, cfg, inputs, targets, deterministic=False, rngs={"dropout": rng}
      )[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step = jax.jit(
    train_step,
    donate_argnums=0,
    in_shardings=(state_shardings, batch_sharding, batch_sharding, None),
    out_shardings=(state_shardings, partitioning.replicated(mesh)),
  )
  inputs, targets = (jax.device_put(x, batch_sharding) for x in _batch())
  losses = []
  with partitioning.activation_context(mesh):
    for i in range(8):
      old_embedding = state[0]["token_embedding"]
      state, loss = step(state, inputs, targets, jax.random.key(i))
      losses.append(float(loss))
  assert old_embedding.is_deleted()  # the state was donated
  assert state[0]["token_embedding"].sharding.spec == param_shardings["token_embedding"].spec
  assert losses[-1] < 0.7 * losses[0], losses
  assert all(np.isfinite(losses))


def _section(**kw):
  from configs import base

  c = base.get_base_config().t5
  c.update(kw)
  return c


@pytest.mark.parametrize("pretrained", [False, True])
def test_initial_params_are_sharded_with_codebook_rows(pretrained):
  import os

  from avg_jax.models import t5_init
  from avg_jax.vokens import VokenVocabulary

  fixture = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "t5_v1_0"
  )
  vocab = VokenVocabulary(text_vocab_size=64, codebook_size=6, num_levels=2, disambiguation_size=2)
  section = _section(
    vocab_size=64,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=3,
    pretrained_path=fixture if pretrained else "",
    scan_layers=True,
  )
  codebook = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
  cfg, params, shardings = t5_init.initial_params(
    section, vocab, codebook, _mesh(), jax.random.key(0)
  )
  assert cfg.vocab_size == 72 and cfg.scan_layers
  emb = params["token_embedding"]
  assert emb.shape == (72, 32) and emb.sharding.spec == shardings["token_embedding"].spec
  np.testing.assert_array_equal(np.asarray(emb)[64:70], codebook)
  query = params["decoder"]["layers"]["self_attention"]["query"]
  assert query.shape == (3, 32, 4, 8)
  assert query.sharding.spec == shardings["decoder"]["layers"]["self_attention"]["query"].spec


def test_sharded_decode_equals_single_device():
  cfg = _cfg()
  mesh = _mesh()
  variables, shardings = partitioning.sharded_init(
    t5.init_variables, mesh, jax.random.key(2), static=(cfg,)
  )
  params = variables["params"]
  inputs, targets = _batch()

  def run(p, inputs, targets):
    encoded = t5.encode(p, cfg, inputs)
    cache = t5.init_decode_state(p, cfg, encoded, inputs, 4)
    outs, token = [], jnp.zeros((inputs.shape[0],), jnp.int32)
    for i in range(3):
      out, cache = t5.decode_step(p, cfg, token, cache, voken_logits_only=True)
      outs.append(out)
      token = targets[:, i]
    return jnp.stack(outs, 1)

  batch_sharding = partitioning.logical_sharding(mesh, "batch", "length")
  with partitioning.activation_context(mesh):
    sharded = jax.jit(run, in_shardings=(shardings["params"], batch_sharding, batch_sharding))(
      params, inputs, targets
    )
  single = jax.jit(run)(jax.device_get(params), inputs, targets)
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5, rtol=0)
