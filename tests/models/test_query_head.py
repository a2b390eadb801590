"""The generator's query head (models/query_head.py): pooling, the ridge fit, save/load, and
the search that predicts query embeddings in its program (hand-computed cases)."""

import jax
import numpy as np
import pytest

from avg_jax.errors import UserError
from avg_jax.models import query_head


def test_pooled_states_average_the_non_padding_positions():
  encoded = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
  # Row 0: positions 0 and 2 are tokens -> mean of [0, 1] and [4, 5]; row 1: all padding.
  tokens = np.array([[5, 0, 7], [0, 0, 0]])
  got = np.asarray(query_head.pooled_states(encoded, tokens))
  np.testing.assert_allclose(got, [[2.0, 3.0], [0.0, 0.0]])


def test_fit_recovers_a_linear_map_and_shrinks_to_the_mean():
  # Exact when the (unit-length) targets are an affine map of the features:
  z = np.array([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])  # unit rows
  x2 = z * 3.0 + 1.0  # features: affine in z
  np.testing.assert_allclose(
    np.asarray(query_head.predict(query_head.fit(x2, z, 0.0), x2.astype(np.float32))), z, atol=1e-5
  )
  # An overwhelming penalty leaves only the bias: every prediction is the targets' mean.
  big = query_head.fit(x2, z, l2=1e12)
  np.testing.assert_allclose(
    np.asarray(query_head.predict(big, x2.astype(np.float32))),
    np.tile(z.mean(0), (4, 1)),
    atol=1e-5,
  )


def test_fit_rejects_bad_inputs():
  with pytest.raises(UserError, match="matching non-empty"):
    query_head.fit(np.zeros((3, 2)), np.zeros((2, 2)), 0.1)
  with pytest.raises(UserError, match="l2 must be >= 0"):
    query_head.fit(np.zeros((3, 2)), np.ones((3, 2)), -1.0)


def test_save_and_load_round_trip(tmp_path):
  head = query_head.fit(np.eye(3), np.eye(3), 0.5)
  query_head.save(str(tmp_path / "h.npz"), head)
  back = query_head.load(str(tmp_path / "h.npz"))
  np.testing.assert_array_equal(np.asarray(back.weight), np.asarray(head.weight))
  np.testing.assert_array_equal(np.asarray(back.bias), np.asarray(head.bias))
  (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(UserError, match="bad.npz: cannot read"):
    query_head.load(str(tmp_path / "bad.npz"))


def test_search_with_the_head_equals_search_with_its_predicted_embeddings():
  from helpers import tiny_t5, tiny_t5_params

  from avg_jax.decoding import search
  from avg_jax.decoding.trie import VokenTrie
  from avg_jax.models import t5 as t5_lib

  vocab, cfg = tiny_t5()
  params = tiny_t5_params(cfg)
  semantic = np.array([[1, 2], [1, 2], [3, 0], [0, 1]])
  image_ids = np.array([40, 41, 42, 43])
  emb = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
  trie = VokenTrie.build(semantic, image_ids, vocab.position_sizes()[:2]).to_device(
    item_embeddings=(image_ids, emb)
  )
  queries = np.random.default_rng(0).integers(3, 21, (3, 5)).astype(np.int32)
  queries[1, 3:] = 0  # padding must not enter the pooled state
  rng = np.random.default_rng(2)
  head = query_head.QueryHead(
    weight=rng.standard_normal((cfg.d_model, 6)).astype(np.float32),
    bias=rng.standard_normal(6).astype(np.float32),
  )
  pooled = query_head.pooled_states(t5_lib.encode(params, cfg, queries), queries)
  predicted = np.asarray(query_head.predict(head, pooled))
  kw = dict(beam_size=3, top_k=3, trained_length=2, hybrid_weight=50.0)
  with_head = jax.device_get(
    search.constrained_search(params, cfg, trie, vocab, queries, query_head=head, **kw)
  )
  with_emb = jax.device_get(
    search.constrained_search(params, cfg, trie, vocab, queries, query_emb=predicted, **kw)
  )
  np.testing.assert_array_equal(with_head.item_ids, with_emb.item_ids)
  np.testing.assert_allclose(with_head.scores, with_emb.scores, rtol=1e-5, atol=1e-5)
