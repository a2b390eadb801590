"""The live index: identifiers of added images, removal, and crash-safe versions on disk."""

import json
import os

import numpy as np
import pytest

from avg_jax.errors import UserError
from avg_jax.export import live_index as live_lib


def _index(learned=True, embeddings=False):
  sizes = (4, 4, 3) if learned else (4, 4)
  base_codes = np.array([[0, 1, 0], [0, 1, 1], [2, 2, 0]])[:, :len(sizes)]
  emb = np.eye(3, 5, dtype=np.float32) if embeddings else None
  return live_lib.LiveIndex(base_ids=np.array([10, 11, 12]), base_codes=base_codes,
                            base_names=np.array(["a.png", "b.png", "c.png"]),
                            position_sizes=sizes, num_levels=2, base_embeddings=emb)


def test_added_images_get_the_next_free_disambiguation_index():
  index = _index()
  codes = index.add(np.array([20, 21]), np.array([[0, 1], [3, 3]]), ["x.png", "y.png"])
  assert codes.tolist() == [[0, 1, 2], [3, 3, 0]]     # (0, 1) had indices 0 and 1
  with pytest.raises(UserError, match="3 disambiguation tokens"):
    index.add(np.array([22]), np.array([[0, 1]]), ["z.png"])
  with pytest.raises(UserError, match="image id 11 is already indexed"):
    index.add(np.array([11]), np.array([[1, 1]]), ["w.png"])
  index.remove([10, 21])
  with pytest.raises(UserError, match="image id 10 is not in the index"):
    index.remove([10])
  with pytest.raises(UserError, match="image id 10 is already indexed"):  # never reused
    index.add(np.array([10]), np.array([[1, 1]]), ["w.png"])
  assert index.live_ids().tolist() == [11, 12, 20]
  assert index.file_names()[20] == "x.png"


def test_semantic_identifiers_have_no_group_limit():
  index = _index(learned=False)
  codes = index.add(np.arange(30, 40), np.tile([[0, 1]], (10, 1)), ["n.png"] * 10)
  assert codes.tolist() == [[0, 1]] * 10


def test_versions_switch_atomically_and_survive_a_half_written_one(tmp_path):
  export = str(tmp_path)
  index = _index(embeddings=True)
  with live_lib.WriteLock(export):
    index.add(np.array([20]), np.array([[3, 3]]), ["x.png"], np.ones((1, 5), np.float32))
    index.save(export)
    index.remove([11])
    index.save(export)
  assert json.loads((tmp_path / "live" / "CURRENT").read_text()) == {"version": 2}
  # A writer killed after writing v3 but before the switch: readers still get v2.
  os.makedirs(tmp_path / "live" / "v3")
  (tmp_path / "live" / "v3" / "delta.npz").write_bytes(b"half")
  again = _index(embeddings=True)
  again.load_changes(export)
  assert again.version == 2 and again.live_ids().tolist() == [10, 12, 20]
  np.testing.assert_array_equal(again.delta_embeddings, np.ones((1, 5)))
  # The next writer replaces the half-written folder.
  with live_lib.WriteLock(export):
    again.add(np.array([21]), np.array([[1, 1]]), ["y.png"], np.ones((1, 5), np.float32))
    again.save(export)
  third = _index(embeddings=True)
  third.load_changes(export)
  assert third.version == 3 and third.live_ids().tolist() == [10, 12, 20, 21]
  assert sorted(os.listdir(tmp_path / "live")) == ["CURRENT", "LOCK", "v2", "v3"]


def test_one_writer_at_a_time_and_damaged_versions_are_errors(tmp_path):
  export = str(tmp_path)
  with live_lib.WriteLock(export):
    with pytest.raises(UserError, match="another process is changing this index"):
      with live_lib.WriteLock(export):
        pass
  os.makedirs(tmp_path / "live" / "v1")
  (tmp_path / "live" / "CURRENT").write_text('{"version": 1}')
  with pytest.raises(UserError, match="damaged live index"):
    _index().load_changes(export)


def test_device_structure_unions_the_delta_and_drops_removed_images():
  index = _index(learned=False)
  assert type(index.device()).__name__ == "DeviceTrie"
  index.add(np.array([20]), np.array([[3, 3]]), ["x.png"])
  index.remove([12])
  union = index.device()
  assert type(union).__name__ == "UnionTrie"
  import jax
  import jax.numpy as jnp
  leaf_b = index._base_trie.lookup(np.array([[2, 2]]))
  items, valid, _ = jax.device_get(union.base.members(jnp.asarray(leaf_b), 1, False))
  assert not valid.any()                               # image 12 is removed
