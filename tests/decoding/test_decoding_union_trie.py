"""A base tree and a delta tree searched as one equal one tree over both (when nothing is
pruned), removed images disappear, and the union's windows hold every child once."""

import jax
import numpy as np
import pytest
from helpers import tiny_t5, tiny_t5_params

from avg_jax.decoding import search
from avg_jax.decoding.trie import VokenTrie
from avg_jax.decoding.union_trie import UnionTrie

VOCAB, CFG = tiny_t5()


@pytest.fixture(scope="module")
def params():
  return tiny_t5_params(CFG)


SIZES = VOCAB.position_sizes()[:2]  # semantic codes: 4 x 4


def _split(seed=0, n=12):
  rng = np.random.default_rng(seed)
  codes = np.stack([rng.integers(0, s, n) for s in SIZES], axis=1)
  ids = np.arange(100, 100 + n)
  return codes, ids


def _live_index(codes, ids, num_base):
  """A live index whose base holds the first `num_base` images."""
  from avg_jax.inference import live_index as live_lib

  return live_lib.LiveIndex(
    base_ids=ids[:num_base],
    base_codes=codes[:num_base],
    base_names=np.full(num_base, ""),
    position_sizes=SIZES,
    num_levels=2,
  )


@pytest.mark.parametrize("dense_levels", [0, 1])
def test_union_search_equals_one_tree_over_both(params, dense_levels):
  codes, ids = _split()
  base = VokenTrie.build(codes[:8], ids[:8], SIZES).to_device(dense_levels)
  delta = VokenTrie.build(codes[8:], ids[8:], SIZES).to_device(0)
  whole = VokenTrie.build(codes, ids, SIZES).to_device(dense_levels)
  union = UnionTrie.of(base, delta)
  queries = np.random.default_rng(1).integers(3, 21, (3, 5)).astype(np.int32)
  kw = dict(beam_size=16, top_k=12, trained_length=2)
  a = jax.device_get(search.constrained_search(params, CFG, whole, VOCAB, queries, **kw))
  b = jax.device_get(search.constrained_search(params, CFG, union, VOCAB, queries, **kw))
  for q in range(3):
    # Same images with the same scores (the order of equal scores may differ: base first).
    pairs = lambda r, q=q: sorted(zip(r.item_ids[q].tolist(), np.round(r.scores[q], 4).tolist()))
    assert pairs(a) == pairs(b)
    np.testing.assert_allclose(np.sort(a.scores[q]), np.sort(b.scores[q]), atol=1e-5)


def test_removed_images_are_not_returned(params):
  codes, ids = _split()
  base = VokenTrie.build(codes[:8], ids[:8], SIZES)
  delta = VokenTrie.build(codes[8:], ids[8:], SIZES)
  alive_base = ~np.isin(base.leaf_items, [100, 103])
  alive_delta = ~np.isin(delta.leaf_items, [110])
  union = UnionTrie.of(
    base.to_device(1).with_alive(jax.numpy.asarray(alive_base)),
    delta.to_device(0).with_alive(jax.numpy.asarray(alive_delta)),
  )
  queries = np.random.default_rng(2).integers(3, 21, (2, 5)).astype(np.int32)
  r = jax.device_get(
    search.constrained_search(
      params, CFG, union, VOCAB, queries, beam_size=16, top_k=9, trained_length=2
    )
  )
  for q in range(2):
    got = [i for i in r.item_ids[q].tolist() if i >= 0]
    assert set(got) == set(ids.tolist()) - {100, 103, 110}


def test_union_children_hold_each_code_once():
  base = VokenTrie.build([[0, 1], [2, 3]], [1, 2], (4, 4)).to_device(0)
  delta = VokenTrie.build([[2, 0], [3, 3]], [3, 4], (4, 4)).to_device(0)
  u = UnionTrie.of(base, delta)
  codes, (cb, cd), valid = jax.device_get(u.children(0, u.root_node((1,)), 4))
  got = sorted(
    (int(c), int(b), int(d)) for c, b, d, v in zip(codes[0], cb[0], cd[0], valid[0]) if v
  )
  # code 0: base only; code 2: both (base node 1, delta node 0); code 3: delta only.
  assert got == [(0, 0, -1), (2, 1, 0), (3, -1, 1)]
  assert u.widths == (4, 2) and u.max_group == 2


@pytest.mark.parametrize("dense_levels", [0, 1])
def test_removed_subtrees_cost_no_beam_slots(params, dense_levels):
  # With a narrow beam, a search that walked into removed images' paths would return fewer
  # or other images than a tree built from the live images alone; pruning makes them equal.
  codes, ids = _split(seed=3, n=16)
  index = _live_index(codes, ids, 10)
  index.add(ids[10:], codes[10:], [""] * 6)
  removed = ids[[0, 1, 2, 3, 4, 10, 11]]
  index.remove(removed)
  keep = ~np.isin(ids, removed)
  alive_only = VokenTrie.build(codes[keep], ids[keep], SIZES).to_device(dense_levels)
  union = index.device(dense_levels)
  queries = np.random.default_rng(4).integers(3, 21, (4, 5)).astype(np.int32)
  kw = dict(beam_size=3, top_k=3, trained_length=2)
  a = jax.device_get(search.constrained_search(params, CFG, alive_only, VOCAB, queries, **kw))
  b = jax.device_get(search.constrained_search(params, CFG, union, VOCAB, queries, **kw))
  for q in range(4):
    assert not set(b.item_ids[q].tolist()) & set(removed.tolist())
    np.testing.assert_allclose(np.sort(a.scores[q]), np.sort(b.scores[q]), atol=1e-5)
    assert sorted(a.item_ids[q].tolist()) == sorted(b.item_ids[q].tolist())
  # Without the pruning (dead leaves only) the narrow beam loses slots on some query.
  plain = union.replace(
    base=union.base.with_alive(union.base.item_alive),
    delta=union.delta.with_alive(union.delta.item_alive),
  )
  c = jax.device_get(search.constrained_search(params, CFG, plain, VOCAB, queries, **kw))
  assert (c.item_ids < 0).sum() > (b.item_ids < 0).sum()


@pytest.mark.parametrize("dense_levels", [0, 1])
def test_delta_only_codes_under_a_dense_base_level_keep_their_code(params, dense_levels):
  # Seed 3: the delta holds root code 1, which the base lacks. The union once labelled that
  # child with code 0 under a dense base level (wrong token, wrong score); with a narrow beam
  # the results then differed from one tree over both.
  codes, ids = _split(seed=3, n=16)
  assert 1 in codes[10:, 0] and 1 not in codes[:10, 0]
  union = UnionTrie.of(
    VokenTrie.build(codes[:10], ids[:10], SIZES).to_device(dense_levels),
    VokenTrie.build(codes[10:], ids[10:], SIZES).to_device(0),
  )
  whole = VokenTrie.build(codes, ids, SIZES).to_device(dense_levels)
  queries = np.random.default_rng(4).integers(3, 21, (4, 5)).astype(np.int32)
  kw = dict(beam_size=3, top_k=3, trained_length=2)
  a = jax.device_get(search.constrained_search(params, CFG, whole, VOCAB, queries, **kw))
  b = jax.device_get(search.constrained_search(params, CFG, union, VOCAB, queries, **kw))
  np.testing.assert_array_equal(a.item_ids, b.item_ids)
  np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def _device_masks(masks):
  items, nodes = masks
  return jax.numpy.asarray(items), tuple(jax.numpy.asarray(m) for m in nodes)


# The CSR base without removals (padding alone must be inert), the dense base with them.
@pytest.mark.parametrize("dense_levels, removed", [(0, []), (1, [109, 112])])
def test_a_padded_delta_searches_exactly_like_the_exact_one(params, dense_levels, removed):
  # Padding a delta to a capacity (a live index does) adds only dead slots: wider windows, a
  # larger max_group, nodes and leaves without children or items. Same images, same order.
  codes, ids = _split(seed=5, n=14)
  codes[12] = codes[9]  # two delta images on one leaf
  base = VokenTrie.build(codes[:8], ids[:8], SIZES).to_device(dense_levels)
  delta = VokenTrie.build(codes[8:], ids[8:], SIZES)
  exact = delta.to_device(0)
  padded = delta.to_device(0, capacity=16)
  assert padded.leaf_items.shape == (16,) and padded.levels[1][0].shape == (17,)
  assert padded.max_group == 2 and padded.widths == SIZES  # whole codebooks as windows
  if removed:
    exact = exact.with_alive(*_device_masks(delta.alive_masks(np.asarray(removed))))
    padded = padded.with_alive(*_device_masks(delta.alive_masks(np.asarray(removed), 16)))
  queries = np.random.default_rng(6).integers(3, 21, (3, 5)).astype(np.int32)
  kw = dict(beam_size=8, top_k=6, trained_length=2)
  a, b = (
    jax.device_get(
      search.constrained_search(params, CFG, UnionTrie.of(base, d), VOCAB, queries, **kw)
    )
    for d in (exact, padded)
  )
  np.testing.assert_array_equal(a.item_ids, b.item_ids)
  np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)
  assert not set(a.item_ids.ravel().tolist()) & set(removed)


def test_a_live_index_keeps_its_search_program_while_the_delta_grows(params):
  # Adds within a capacity bucket (and removals after the first) change no shape: the search
  # compiled for the first added image serves the next ones.
  from helpers import CompileCounter

  codes, ids = _split(seed=7, n=20)
  # The added images on distinct leaves: a leaf holding more images than the delta's
  # `max_group` (rounded up to a power of two) is a shape change of its own.
  leaves = np.stack(np.meshgrid(range(SIZES[0]), range(SIZES[1]), indexing="ij"), -1)
  codes[8:] = np.random.default_rng(9).permutation(leaves.reshape(-1, 2))[:12]
  index = _live_index(codes, ids, 8)
  queries = np.random.default_rng(8).integers(3, 21, (2, 5)).astype(np.int32)
  kw = dict(beam_size=8, top_k=6, trained_length=2)

  def find():
    return jax.device_get(
      search.constrained_search(params, CFG, index.device(1), VOCAB, queries, **kw)
    )

  index.add(ids[8:9], codes[8:9], [""])
  find()
  index.remove(ids[8:9])
  find()  # the first removal adds the alive masks: a program of its own
  with CompileCounter() as compiles:
    for i in range(9, 20):
      index.add(ids[i : i + 1], codes[i : i + 1], [""])
      got = find()
    index.remove(ids[[0, 12]])
    got = find()
  assert compiles.count == 0
  live = set(ids.tolist()) - {int(ids[0]), int(ids[8]), int(ids[12])}
  assert {i for i in got.item_ids.ravel().tolist() if i >= 0} <= live
