"""Checkpoint files: small replicated arrays are saved without compiling per-replica slice
programs, and the files are orbax's standard ones in both directions."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from helpers import CompileCounter

from avg_jax import partitioning
from avg_jax.artifacts import checkpoints


def _replicated_state():
  mesh = partitioning.make_mesh({"data": -1})
  replicated = partitioning.replicated(mesh)
  state = {
    "w": jnp.arange(2 * 16, dtype=jnp.float32).reshape(2, 16),
    "b": jnp.ones((33,), jnp.float32),
    "step": jnp.int32(7),
  }
  return jax.device_put(state, replicated)


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_small_replicated_arrays_save_without_compiling_and_restore(tmp_path):
  assert jax.device_count() == 8
  state = _replicated_state()
  jax.block_until_ready(state)
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), async_save=False)
  # Orbax's default splits each replicated array over its 8 replicas: a slice program per
  # (shape, device) of the arrays it can split (8 compiles here, for `w`). Below
  # REPLICA_PARALLEL_MIN_SLICE_BYTES there are none.
  with CompileCounter() as compiles:
    ckpt.save(3, state)
    ckpt.close()
  assert compiles.count == 0
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), async_save=False)
  restored, metadata = ckpt.restore(3, _abstract(state))
  ckpt.close()
  assert metadata["step"] == 3
  for key in state:
    np.testing.assert_array_equal(restored[key], state[key])
    assert restored[key].sharding == state[key].sharding


def test_parameters_are_orbax_standard_files_both_ways(tmp_path):
  state = _replicated_state()
  # Written here, read by orbax's standard reader.
  checkpoints.save_params(str(tmp_path / "ours"), state)
  with ocp.StandardCheckpointer() as reader:
    theirs = reader.restore(str(tmp_path / "ours"), _abstract(state))
  # Written by orbax's standard writer (as avg-jax did before), read here.
  with ocp.StandardCheckpointer() as writer:
    writer.save(str(tmp_path / "standard"), state)
    writer.wait_until_finished()
  ours = checkpoints.load_params(str(tmp_path / "standard"), _abstract(state))
  for key in state:
    np.testing.assert_array_equal(theirs[key], state[key])
    np.testing.assert_array_equal(ours[key], state[key])
