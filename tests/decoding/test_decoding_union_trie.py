"""A base tree and a delta tree searched as one equal one tree over both (when nothing is
pruned), removed images disappear, and the union's windows hold every child once."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from avg_jax.decoding import search
from avg_jax.decoding.trie import VokenTrie
from avg_jax.decoding.union_trie import UnionTrie
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import VokenVocabulary

VOCAB = VokenVocabulary(text_vocab_size=21, codebook_size=4, num_levels=2, shared_codebook=False,
                        disambiguation_size=3)
CFG = T5Config(vocab_size=VOCAB.total_vocab_size, num_voken_tokens=VOCAB.num_voken_tokens,
               d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=1,
               num_decoder_layers=1, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
  variables = jax.jit(lambda r: nn.unbox(t5_lib.init_variables(CFG, r)))(jax.random.key(1))
  p = dict(variables["params"])
  p["token_embedding"] = p["token_embedding"] * 4.0
  return p

SIZES = VOCAB.position_sizes()[:2]   # semantic codes: 4 x 4


def _split(seed=0, n=12):
  rng = np.random.default_rng(seed)
  codes = np.stack([rng.integers(0, s, n) for s in SIZES], axis=1)
  ids = np.arange(100, 100 + n)
  return codes, ids


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
    pairs = lambda r: sorted(zip(r.item_ids[q].tolist(), np.round(r.scores[q], 4).tolist()))
    assert pairs(a) == pairs(b)
    np.testing.assert_allclose(np.sort(a.scores[q]), np.sort(b.scores[q]), atol=1e-5)


def test_removed_images_are_not_returned(params):
  codes, ids = _split()
  base = VokenTrie.build(codes[:8], ids[:8], SIZES)
  delta = VokenTrie.build(codes[8:], ids[8:], SIZES)
  alive_base = ~np.isin(base.leaf_items, [100, 103])
  alive_delta = ~np.isin(delta.leaf_items, [110])
  union = UnionTrie.of(base.to_device(1).with_alive(jax.numpy.asarray(alive_base)),
                       delta.to_device(0).with_alive(jax.numpy.asarray(alive_delta)))
  queries = np.random.default_rng(2).integers(3, 21, (2, 5)).astype(np.int32)
  r = jax.device_get(search.constrained_search(params, CFG, union, VOCAB, queries,
                                               beam_size=16, top_k=9, trained_length=2))
  for q in range(2):
    got = [i for i in r.item_ids[q].tolist() if i >= 0]
    assert set(got) == set(ids.tolist()) - {100, 103, 110}


def test_union_children_hold_each_code_once():
  base = VokenTrie.build([[0, 1], [2, 3]], [1, 2], (4, 4)).to_device(0)
  delta = VokenTrie.build([[2, 0], [3, 3]], [3, 4], (4, 4)).to_device(0)
  u = UnionTrie.of(base, delta)
  codes, (cb, cd), valid = jax.device_get(u.children(0, u.root_node((1,)), 4))
  got = sorted((int(c), int(b), int(d)) for c, b, d, v in zip(codes[0], cb[0], cd[0], valid[0])
               if v)
  # code 0: base only; code 2: both (base node 1, delta node 0); code 3: delta only.
  assert got == [(0, 0, -1), (2, 1, 0), (3, -1, 1)]
  assert u.widths == (4, 2) and u.max_group == 2
