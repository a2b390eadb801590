"""The live index: identifiers of added images, removal, and crash-safe versions on disk."""

import json
import os

import numpy as np
import pytest

from avg_jax.errors import UserError
from avg_jax.inference import live_index as live_lib


def _index(learned=True, embeddings=False):
  sizes = (4, 4, 3) if learned else (4, 4)
  base_codes = np.array([[0, 1, 0], [0, 1, 1], [2, 2, 0]])[:, : len(sizes)]
  emb = np.eye(3, 5, dtype=np.float32) if embeddings else None
  return live_lib.LiveIndex(
    base_ids=np.array([10, 11, 12]),
    base_codes=base_codes,
    base_names=np.array(["a.png", "b.png", "c.png"]),
    position_sizes=sizes,
    num_levels=2,
    base_embeddings=emb,
  )


def test_added_images_get_the_next_free_disambiguation_index():
  index = _index()
  codes = index.add(np.array([20, 21]), np.array([[0, 1], [3, 3]]), ["x.png", "y.png"])
  assert codes.tolist() == [[0, 1, 2], [3, 3, 0]]  # (0, 1) had indices 0 and 1
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
  assert json.loads((tmp_path / "live" / "CURRENT").read_text())["version"] == 2
  # A writer killed after writing v3 but before the switch: readers still get v2.
  os.makedirs(tmp_path / "live" / "v3")
  (tmp_path / "live" / "v3" / "delta.npz").write_bytes(b"half")
  again = _index(embeddings=True)
  again.load_changes(export)
  assert again.version == 2 and again.live_ids().tolist() == [10, 12, 20]
  np.testing.assert_array_equal(again.delta_embeddings, np.ones((1, 5)))
  # The next writer never overwrites a folder: it writes v4, then removes the half-written
  # v3 (never committed).
  with live_lib.WriteLock(export):
    again.add(np.array([21]), np.array([[1, 1]]), ["y.png"], np.ones((1, 5), np.float32))
    again.save(export)
  third = _index(embeddings=True)
  third.load_changes(export)
  assert third.version == 4 and third.live_ids().tolist() == [10, 12, 20, 21]
  assert sorted(os.listdir(tmp_path / "live")) == ["CURRENT", "LOCK", "v2", "v4"]


def test_one_writer_at_a_time_and_damaged_versions_are_errors(tmp_path):
  export = str(tmp_path)
  with live_lib.WriteLock(export):
    with pytest.raises(UserError, match="another process is changing this index"):
      with live_lib.WriteLock(export):
        pass
  os.makedirs(tmp_path / "live" / "v1")
  (tmp_path / "live" / "CURRENT").write_text('{"version": 1}')
  with pytest.raises(live_lib.LiveIndexDamaged, match="damaged live index"):
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
  assert not valid.any()  # image 12 is removed


def _save(index, export, *, add=None, remove=None):
  with live_lib.WriteLock(export):
    if add is not None:
      index.add(np.asarray(add), np.tile([[3, 3]], (len(add), 1)), [f"{i}.png" for i in add])
    if remove is not None:
      index.remove(remove)
    index.save(export)


def _loaded(export):
  index = _index(learned=False)
  index.load_changes(export)
  return index


def test_storage_grows_with_the_text_not_with_the_longest_string(tmp_path):
  export = str(tmp_path)
  index = _index(learned=False)
  long_name = "n" * live_lib.MAX_FILE_NAME_CHARS
  captions = [["a caption", "é" * live_lib.MAX_CAPTION_CHARS]] + [["short"]] * 299
  with live_lib.WriteLock(export):
    index.add(
      np.arange(100, 400),
      np.tile([[3, 3]], (300, 1)),
      [long_name] + ["x.png"] * 299,
      captions=captions,
    )
    index.save(export)
  # Fixed-width strings took 300 x (1024 + 2000) x 4 bytes (3.6 MB); the text is ~6 KB.
  assert os.path.getsize(tmp_path / "live" / "v1" / "delta.npz") < 40_000
  again = _loaded(export)
  assert again.file_names()[100] == long_name and again.file_names()[399] == "x.png"
  assert again.captions()[100] == captions[0] and again.captions()[101] == ["short"]
  for name, caps, match in (
    (
      "n" * (live_lib.MAX_FILE_NAME_CHARS + 1),
      [],
      "file name of 1025 characters, the limit is 1024",
    ),
    ("a.png", ["c" * (live_lib.MAX_CAPTION_CHARS + 1)], "caption 0 of 2001 characters"),
    ("a.png", ["c"] * (live_lib.MAX_CAPTIONS + 1), "at most 32 captions"),
    ("\ud800.png", [], "lone surrogate at character 0"),
  ):
    with pytest.raises(UserError, match=match):
      again.add(np.array([500]), np.array([[3, 3]]), [name], captions=[caps])


def test_live_index_written_before_the_seal_still_loads(tmp_path):
  folder = tmp_path / "live" / "v1"
  os.makedirs(folder)
  np.savez(
    folder / "delta.npz",
    image_ids=np.array([20]),
    codes=np.array([[3, 3]]),
    file_names=np.array(["old.png"]),
    captions=np.array(['["an old caption"]']),
  )
  np.savez(folder / "removed.npz", removed=np.array([11]))
  (tmp_path / "live" / "CURRENT").write_text('{"version": 1}')
  index = _loaded(str(tmp_path))
  assert index.version == 1 and index.live_ids().tolist() == [10, 12, 20]
  assert index.file_names()[20] == "old.png" and index.captions() == {20: ["an old caption"]}
  _save(index, str(tmp_path), add=[21])  # the next change writes the sealed layout
  again = _loaded(str(tmp_path))
  assert again.version == 2 and again.file_names()[20] == "old.png"
  assert "checksum" in json.loads((tmp_path / "live" / "CURRENT").read_text())


def test_current_is_sealed_with_its_version_and_files(tmp_path):
  export, live = str(tmp_path), tmp_path / "live"
  index = _index(learned=False)
  _save(index, export, add=[20])
  _save(index, export, add=[21])
  sealed_v2 = (live / "CURRENT").read_text()
  _save(index, export, add=[22])
  sealed_v3 = (live / "CURRENT").read_text()
  assert _loaded(export).version == 3
  # Hand edits of CURRENT: the number changed, the seal dropped, an old CURRENT restored.
  (live / "CURRENT").write_text(sealed_v3.replace('"version": 3', '"version": 2'))
  with pytest.raises(live_lib.LiveIndexDamaged, match="does not match its checksum"):
    _loaded(export)
  (live / "CURRENT").write_text('{"version": 2}')
  with pytest.raises(live_lib.LiveIndexDamaged, match="has no checksum but names version 2"):
    _loaded(export)
  (live / "CURRENT").write_text(sealed_v2)
  with pytest.raises(
    live_lib.LiveIndexDamaged, match="names version 2 but version 3 was committed after it"
  ):
    _loaded(export)
  os.remove(live / "CURRENT")
  with pytest.raises(live_lib.LiveIndexDamaged, match="is missing but version 3 was committed"):
    _loaded(export)
  (live / "CURRENT").write_text(sealed_v3)
  assert _loaded(export).live_ids().tolist() == [10, 11, 12, 20, 21, 22]
  # Bytes of the version's files changed in place (same size), or cut short.
  data = bytearray((live / "v3" / "removed.npz").read_bytes())
  data[-1] ^= 0xFF
  (live / "v3" / "removed.npz").write_bytes(bytes(data))
  with pytest.raises(
    live_lib.LiveIndexDamaged,
    match=r"v3/removed\.npz does not match its "
    r"checksum",
  ):
    _loaded(export)
  (live / "v3" / "removed.npz").write_bytes(bytes(data[:-10]))
  with pytest.raises(live_lib.LiveIndexDamaged, match=r"v3/removed\.npz has \d+ bytes"):
    _loaded(export)


def test_a_writer_never_overwrites_an_existing_version(tmp_path):
  export, live = str(tmp_path), tmp_path / "live"
  index = _index(learned=False)
  _save(index, export, add=[20])
  _save(index, export, add=[21])
  stale = _loaded(export)  # a writer that read v2 ...
  _save(index, export, add=list(range(30, 330)))  # ... while another wrote v3 (300 images)
  v3 = {name: (live / "v3" / name).read_bytes() for name in ("delta.npz", "removed.npz")}
  _save(stale, export, add=[22])  # its change is v4, never a second v3
  assert stale.version == 4
  assert {name: (live / "v3" / name).read_bytes() for name in v3} == v3
  assert sorted(os.listdir(live)) == ["CURRENT", "LOCK", "v2", "v3", "v4"]


def test_automatic_ids_survive_the_largest_explicit_id(tmp_path):
  index = _index(learned=False)
  assert index.next_ids(2).tolist() == [13, 14]
  _save(index, str(tmp_path), add=[live_lib.MAX_ID])
  assert index.next_ids(3).tolist() == [0, 1, 2]  # the smallest ids never used
  _save(index, str(tmp_path), remove=[live_lib.MAX_ID])
  again = _loaded(str(tmp_path))
  assert again.next_ids(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14]
  with pytest.raises(UserError, match=r"image ids must lie in \[0, 2147483647\]"):
    again.add(np.array([live_lib.MAX_ID + 1]), np.array([[3, 3]]), ["x.png"])


@pytest.mark.parametrize(
  "text",
  [
    "\u0663\u0666\u0660\u0663",
    "1_0",
    "+1",
    "-1",
    " 1",
    "1 ",
    "0x1",
    "",
    "1" * 5000,
    "2147483648",
    "\uff11",
  ],
)
def test_ids_are_ascii_digits_in_range(text):
  with pytest.raises(ValueError):
    live_lib.parse_id(text)


def test_ids_in_range_parse():
  assert [live_lib.parse_id(t) for t in ("0", "007", "2147483647")] == [0, 7, 2147483647]
