"""Meshes, the rules table and sharded init on 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import CompileCounter
from jax.sharding import PartitionSpec as P

from avg_jax import partitioning
from avg_jax.errors import UserError


class TinyMlp(nn.Module):
  """Embed -> mlp -> embed with a vocab projection, annotated like the real models."""

  mlp: int = 32

  @nn.compact
  def __call__(self, x):  # x: [batch, length, embed]
    init = nn.initializers.normal(0.02)
    w_in = self.param("w_in", nn.with_logical_partitioning(init, ("embed", "mlp")), (16, self.mlp))
    w_out = self.param(
      "w_out", nn.with_logical_partitioning(init, ("mlp", "embed")), (self.mlp, 16)
    )
    vocab = self.param("vocab", nn.with_logical_partitioning(init, ("vocab", "embed")), (8, 16))
    scale = self.param(
      "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (16,)
    )
    h = nn.with_logical_constraint(jnp.einsum("ble,em->blm", x, w_in), ("batch", "length", "mlp"))
    y = jnp.einsum("blm,me->ble", nn.relu(h), w_out) * scale
    return jnp.einsum("ble,ve->blv", y, vocab)


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize(
  "cfg, expected",
  [
    ({"data": -1}, (8, 1, 1)),
    ({"data": 4, "model": 2}, (4, 1, 2)),
    ({"data": 2, "fsdp": -1, "model": 2}, (2, 2, 2)),
  ],
)
def test_mesh_shape(cfg, expected):
  assert partitioning.mesh_shape(cfg, 8) == expected


@pytest.mark.parametrize(
  "cfg, message",
  [
    ({"data": 3}, "needs 3 devices, 8 are available"),
    ({"data": -1, "model": -1}, "at most one axis may be -1"),
    ({"data": -1, "model": 3}, "do not divide"),
    ({"dp": 8}, "unknown axis 'dp'"),
  ],
)
def test_bad_mesh_config(cfg, message):
  with pytest.raises(UserError, match=message):
    partitioning.mesh_shape(cfg, 8)


def test_param_specs_on_4x2_mesh():
  mesh = partitioning.make_mesh({"data": 4, "model": 2})
  model = TinyMlp()
  x = jnp.ones((8, 4, 16))
  params, shardings = partitioning.sharded_init(lambda: model.init(jax.random.key(0), x), mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings)["params"]
  # fsdp has size 1 here; "embed" maps to it, "mlp"/"vocab" to model.
  assert specs["w_in"] == P("fsdp", "model")
  assert specs["w_out"] == P("model", "fsdp")
  assert specs["vocab"] == P("model", "fsdp")
  assert specs["scale"] == P("fsdp")
  w_in = params["params"]["w_in"]
  assert not isinstance(w_in, nn.LogicallyPartitioned)
  # Each device holds a 16 x 16 half of w_in (model axis of size 2).
  assert {s.data.shape for s in w_in.addressable_shards} == {(16, 16)}


def _init_tiny(width, rng):
  return TinyMlp(width).init(rng, jnp.ones((8, 4, 16)))


def test_sharded_init_compiles_once_per_static_configuration():
  mesh = partitioning.make_mesh({"data": 4, "model": 2})
  first, _ = partitioning.sharded_init(_init_tiny, mesh, jax.random.key(0), static=(32,))
  with CompileCounter() as compiles:
    again, _ = partitioning.sharded_init(
      _init_tiny, partitioning.make_mesh({"data": 4, "model": 2}), jax.random.key(0), static=(32,)
    )
  assert compiles.count == 0  # e.g. evaluate's second generator of the same shapes
  jax.tree.map(np.testing.assert_array_equal, again, first)
  with CompileCounter() as compiles:
    wider, _ = partitioning.sharded_init(_init_tiny, mesh, jax.random.key(0), static=(64,))
  assert compiles.count == 1
  assert wider["params"]["w_in"].shape == (16, 64)


def test_jitted_step_with_donation_matches_unsharded():
  mesh = partitioning.make_mesh({"data": 4, "model": 2})
  model = TinyMlp()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 4, 16)).astype(np.float32)
  labels = rng.integers(0, 8, size=(8, 4))
  tx = optax.sgd(0.1)

  def loss_fn(params, x, labels):
    logits = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, batch["x"], batch["labels"])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  params, shardings = partitioning.sharded_init(lambda: model.init(jax.random.key(0), x), mesh)
  opt_state = tx.init(params)
  state_sharding = (shardings, jax.tree.map(lambda a: a.sharding, opt_state))
  batch = partitioning.shard_host_batch({"x": x, "labels": labels}, mesh)
  assert batch["x"].sharding.spec == P(("data", "fsdp"), None, None)
  batch_sharding = jax.tree.map(lambda a: a.sharding, batch)
  jitted = jax.jit(
    step,
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, partitioning.replicated(mesh)),
    donate_argnums=(0,),
  )
  reference_params = nn.unbox(model.init(jax.random.key(0), x))
  with partitioning.activation_context(mesh):
    (new_params, _), loss = jitted((params, opt_state), batch)
  assert params["params"]["w_in"].is_deleted()  # donated
  (ref_params, _), ref_loss = step(
    (reference_params, tx.init(reference_params)), {"x": x, "labels": labels}
  )
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_params, ref_params)
  assert new_params["params"]["w_in"].sharding.spec == P("fsdp", "model")


def test_logical_sharding_helper():
  mesh = partitioning.make_mesh({"data": 8})
  s = partitioning.logical_sharding(mesh, "items", "embed")
  # Rules are claimed in table order: "items" takes data+fsdp first, so "embed" stays whole.
  assert s.spec == P(("data", "fsdp"), None)


def test_rules_from_the_config_apply_inside_their_block_only():
  mesh = partitioning.make_mesh({"data": 4, "fsdp": 2})
  # The default table shards `embed` over fsdp; a config that stops fsdp for parameters.
  no_fsdp = [(name, None if name == "embed" else axes) for name, axes in partitioning.LOGICAL_RULES]
  assert partitioning.logical_sharding(mesh, "embed", "mlp").spec == P("fsdp", "model")
  with partitioning.rules_in_use(no_fsdp):
    assert partitioning.logical_sharding(mesh, "embed", "mlp").spec == P(None, "model")
  assert partitioning.active_rules() == partitioning.LOGICAL_RULES


@pytest.mark.parametrize(
  "rules,message",
  [
    ([("embed",)], r"partitioning.rules\[0\]: expected"),
    (
      [("batch", "data"), ("embed", "tensor")],
      r"partitioning.rules\[1\] \('embed'\): unknown mesh axis 'tensor'",
    ),
  ],
)
def test_bad_rules_table_names_the_entry(rules, message):
  with pytest.raises(UserError, match=message):
    with partitioning.rules_in_use(rules):
      pass
  assert partitioning.active_rules() == partitioning.LOGICAL_RULES
