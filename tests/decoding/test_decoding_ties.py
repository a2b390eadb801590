"""Images that share their semantic codes: per-index identifiers, leaf expansion by id or by
similarity, and no score from an untrained disambiguation logit (hand-computed cases)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax.decoding import beam_search as bs
from avg_jax.decoding import search
from avg_jax.decoding.trie import VokenTrie
from avg_jax.tokenizer import ids


def table_step(tokens, cache):
  """tokens [n] -> (log-prob rows [n, V] indexed by the last token), the cache unchanged."""
  (table,) = cache
  return jnp.take_along_axis(table, tokens[:, None, None], axis=1)[:, 0], cache


@functools.partial(jax.jit, static_argnames=("token_offsets", "beam_size"))
def run(table, trie, *, token_offsets, beam_size=2):
  return bs.beam_search(
    table_step,
    (table,),
    trie,
    batch_size=1,
    beam_size=beam_size,
    token_offsets=token_offsets,
    eos_id=1,
  )


# Tokens: 0 start, 1 EOS, 2/3 = semantic code 0/1 (L = 1), 4/5 = disambiguation index 0/1.
# The generator learned index 0 after code 0 (training image 1 has identifier (0, 0)); index
# 1 after code 0 was never a training target, so it is nearly impossible.
#                      start  EOS   c0    c1    d0    d1
PROBS = np.array(
  [
    [0.01, 0.01, 0.60, 0.30, 0.04, 0.04],  # after start
    [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],  # (after EOS: unused)
    [0.01, 0.01, 0.01, 0.01, 0.959, 0.001],  # after c0
    [0.01, 0.01, 0.01, 0.01, 0.80, 0.16],  # after c1
    [0.01, 0.90, 0.03, 0.03, 0.02, 0.01],  # after d0
    [0.01, 0.90, 0.03, 0.03, 0.02, 0.01],
  ]
)  # after d1
TABLE = jnp.asarray(np.log(PROBS)[None], jnp.float32)


def test_a_test_image_sharing_codes_with_a_training_image_is_not_penalised():
  codes = {"train": np.array([[0]]), "test": np.array([[0], [1]])}
  image_ids = {"train": np.array([1]), "test": np.array([11, 12])}
  # Over all splits together (the old way) test image 11 becomes (0, 1): index 1 after code 0
  # costs log(.001) and pushes it below image 12 although its code is twice as likely.
  everything, _ = ids.disambiguate(
    np.concatenate([codes["train"], codes["test"]]), np.array([1, 11, 12])
  )
  assert everything[1:].tolist() == [[0, 1], [1, 0]]
  trie = VokenTrie.build(everything[1:], [11, 12], (2, 2)).to_device()
  r = run(TABLE, trie, token_offsets=(2, 4))
  got = jax.device_get(r)
  assert got.codes.tolist() == [[[1, 0], [0, 1]]]  # 12 first: the penalty
  np.testing.assert_allclose(got.scores[0], np.log([0.3 * 0.8 * 0.9, 0.6 * 0.001 * 0.9]), rtol=1e-5)
  # Within its own index, image 11 is the first with code 0: identifier (0, 0), ranked by
  # what the generator learned.
  per_index, d = ids.disambiguate_per_index(codes, image_ids)
  assert per_index["test"].tolist() == [[0, 0], [1, 0]] and d == 2
  trie = VokenTrie.build(per_index["test"], [11, 12], (2, 2)).to_device()
  got = jax.device_get(run(TABLE, trie, token_offsets=(2, 4)))
  assert got.codes.tolist() == [[[0, 0], [1, 0]]]
  np.testing.assert_allclose(got.scores[0], np.log([0.6 * 0.959 * 0.9, 0.3 * 0.8 * 0.9]), rtol=1e-5)


def _grouped_trie():
  # Leaf (0, 1) holds images 5 and 7; leaf (1, 0) holds image 3.
  return VokenTrie.build([[0, 1], [1, 0], [0, 1]], [5, 3, 7], (2, 2))


# Jitted as the search runs it: eagerly, each of its primitives compiled a program of its own.
_expand_leaves = jax.jit(search.expand_leaves, static_argnums=3)


def test_expand_leaves_by_id_and_by_similarity():
  trie = _grouped_trie()
  emb = (np.array([3, 5, 7]), np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))
  dev = trie.to_device(item_embeddings=emb)
  assert dev.max_group == 2
  leaf = jnp.asarray([[trie.lookup(np.array([[1, 0]]))[0], trie.lookup(np.array([[0, 1]]))[0]]])
  scores = jnp.asarray([[-1.0, -2.0]])
  items, out_scores, rank, sim = jax.device_get(_expand_leaves(dev, leaf, scores, 3))
  assert sim is None
  assert items.tolist() == [[3, 5, 7]]  # leaf order, then image id
  assert out_scores.tolist() == [[-1.0, -2.0, -2.0]]  # every image gets its leaf's score
  assert rank.tolist() == [[0, 1, 1]]
  query = jnp.asarray([[0.0, 2.0]])  # closer to image 7 than to 5
  items, out_scores, _, sim = jax.device_get(_expand_leaves(dev, leaf, scores, 3, query))
  assert items.tolist() == [[3, 7, 5]]
  np.testing.assert_allclose(sim, [[2**-0.5, 1.0, 0.0]], atol=1e-6)
  assert out_scores.tolist() == [[-1.0, -2.0, -2.0]]
  # Fewer images than results, and a missing leaf (-1): empty slots.
  items, out_scores, rank, _ = jax.device_get(
    _expand_leaves(dev, jnp.asarray([[leaf[0, 0], -1]]), scores, 3)
  )
  assert items.tolist() == [[3, -1, -1]] and rank.tolist() == [[0, -1, -1]]
  assert out_scores[0, 0] == -1.0 and np.all(np.isneginf(out_scores[0, 1:]))
  # k smaller than a leaf: only the best of it.
  items, _, _, _ = jax.device_get(_expand_leaves(dev, leaf[:, 1:], scores[:, 1:], 1, query))
  assert items.tolist() == [[7]]


def test_hybrid_rescoring_by_hand():
  # The beam's images with their generative log-probs and cosine similarities to the query.
  ids = jnp.asarray([[3, 5, 7, -1]])
  scores = jnp.asarray([[-1.0, -1.5, -3.0, -jnp.inf]])
  sim = jnp.asarray([[0.1, 0.5, 0.9, -jnp.inf]])
  # weight 2: fused -0.8, -0.5, -1.2 -> 5, 3, 7; weight 0 keeps the generator's order.
  got, fused, order = jax.device_get(search.hybrid_rescore(ids, scores, sim, 2.0, 3))
  assert got.tolist() == [[5, 3, 7]] and order.tolist() == [[1, 0, 2]]
  np.testing.assert_allclose(fused, [[-0.5, -0.8, -1.2]], atol=1e-6)
  got, _, _ = jax.device_get(search.hybrid_rescore(ids, scores, sim, 0.0, 4))
  assert got.tolist() == [[3, 5, 7, -1]]
  # weight 10: similarity dominates -> 7 (8.0), 5 (3.5), 3 (0.0)
  got, _, _ = jax.device_get(search.hybrid_rescore(ids, scores, sim, 10.0, 2))
  assert got.tolist() == [[7, 5]]


def test_item_embeddings_must_cover_the_index():
  from avg_jax.errors import UserError

  with pytest.raises(UserError, match="no embedding for indexed item 7"):
    _grouped_trie().to_device(item_embeddings=(np.array([3, 5]), np.ones((2, 2))))


# --- the same on a tiny random T5 ---------------------------------------------------------------

from helpers import tiny_t5, tiny_t5_params  # noqa: E402

from avg_jax.models import t5 as t5_lib  # noqa: E402

VOCAB, CFG = tiny_t5()


@pytest.fixture(scope="module")
def params():
  return tiny_t5_params(CFG)


def _log_probs(params, queries, targets):
  """[B, n, T] teacher-forced log-probs of `targets [n, T]` for every query."""
  b, n = queries.shape[0], len(targets)
  logits = jax.jit(t5_lib.logits, static_argnums=1)(
    params, CFG, np.repeat(queries, n, axis=0), np.tile(targets, (b, 1))
  )
  lp = jax.nn.log_softmax(logits, axis=-1)
  tgt = np.tile(targets, (b, 1))
  return np.asarray(jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0]).reshape(b, n, -1)


@pytest.mark.parametrize("trained_length", [2, 3])
def test_search_over_semantic_codes_scores_each_leaf_once(params, trained_length):
  # Images 40 and 41 share semantic codes (1, 2); the trie holds the semantic codes only.
  semantic = np.array([[1, 2], [3, 0], [1, 2], [0, 1], [2, 2]])
  image_ids = np.array([41, 42, 40, 43, 44])
  trie = VokenTrie.build(semantic, image_ids, VOCAB.position_sizes()[:2])
  queries = np.random.default_rng(0).integers(3, 21, (3, 5)).astype(np.int32)
  result = jax.device_get(
    search.constrained_search(
      params, CFG, trie, VOCAB, queries, beam_size=5, top_k=5, trained_length=trained_length
    )
  )
  leaves = trie.leaf_codes()  # [4, 2]
  if trained_length == 2:  # the generator stops after the semantic codes: + EOS
    targets = VOCAB.target_tokens(leaves)
    expected = _log_probs(params, queries, targets).sum(-1)
  else:  # it would go on to a disambiguation token: no EOS step
    targets = VOCAB.codes_to_tokens(np.concatenate([leaves, np.zeros((4, 1), int)], 1))
    expected = _log_probs(params, queries, targets)[..., :2].sum(-1)
  for q in range(3):
    order = np.argsort(-expected[q], kind="stable")
    want_ids = [
      i for leaf in order for i in sorted(image_ids[np.all(semantic == leaves[leaf], axis=1)])
    ]
    assert result.item_ids[q].tolist() == want_ids
    want_scores = [
      expected[q, leaf]
      for leaf in order
      for _ in range(int(np.all(semantic == leaves[leaf], axis=1).sum()))
    ]
    np.testing.assert_allclose(result.scores[q], want_scores, rtol=1e-4, atol=1e-4)
    # The two images of leaf (1, 2) have exactly the same score.
    a, b = (result.item_ids[q].tolist().index(i) for i in (40, 41))
    assert result.scores[q, a] == result.scores[q, b] and abs(a - b) == 1
    assert result.sequences[q].tolist() == [list(leaves[i]) for i in order] + [[-1, -1]]


def test_hybrid_search_reranks_the_beam_by_similarity(params):
  semantic = np.array([[1, 2], [3, 0], [0, 1], [2, 2]])
  image_ids = np.array([40, 41, 42, 43])
  emb = np.eye(4, dtype=np.float32)  # image i's embedding: the i-th axis
  trie = VokenTrie.build(semantic, image_ids, VOCAB.position_sizes()[:2]).to_device(
    item_embeddings=(image_ids, emb)
  )
  queries = np.random.default_rng(0).integers(3, 21, (2, 5)).astype(np.int32)
  query_emb = np.asarray([[0, 0, 0, 1.0], [0, 0, 0, 1.0]], np.float32)  # like image 43
  kw = dict(beam_size=4, top_k=4, trained_length=2, query_emb=query_emb)
  plain = jax.device_get(search.constrained_search(params, CFG, trie, VOCAB, queries, **kw))
  strong = jax.device_get(
    search.constrained_search(params, CFG, trie, VOCAB, queries, hybrid_weight=1e4, **kw)
  )
  zero = jax.device_get(
    search.constrained_search(params, CFG, trie, VOCAB, queries, hybrid_weight=0.0, **kw)
  )
  np.testing.assert_array_equal(zero.item_ids, plain.item_ids)  # weight 0: the generator's
  assert strong.item_ids[:, 0].tolist() == [43, 43]  # similarity decides
  for q in range(2):
    rank = plain.item_ids[q].tolist().index(43)
    assert strong.scores[q, 0] == pytest.approx(plain.scores[q, rank] + 1e4, rel=1e-6)


def test_hybrid_under_the_id_tie_break_rescores_the_plain_beam_only(params):
  """With `order_by_similarity=False` ("image_id" tie-break), avg_hybrid re-scores exactly the
  B images the plain search returns (a leaf's first images by id), so it never reads more than
  B images of a large group; by similarity, it would reach into the whole group."""
  from avg_jax.evaluation import hybrid

  # Leaf (1, 2) holds images 40, 41, 42; the query is most like 42, the third by id. Two
  # leaves and two beams: both leaves are always in the beam.
  semantic = np.array([[1, 2], [1, 2], [1, 2], [3, 0]])
  image_ids = np.array([40, 41, 42, 43])
  emb = np.eye(4, dtype=np.float32)
  trie = VokenTrie.build(semantic, image_ids, VOCAB.position_sizes()[:2]).to_device(
    item_embeddings=(image_ids, emb)
  )
  queries = np.random.default_rng(0).integers(3, 21, (2, 5)).astype(np.int32)
  query_emb = np.tile(np.float32([0, 0, 1, 0]), (2, 1))
  kw = dict(beam_size=2, top_k=2, trained_length=2)
  plain = jax.device_get(search.constrained_search(params, CFG, trie, VOCAB, queries, **kw))
  by_id = jax.device_get(
    search.constrained_search(
      params,
      CFG,
      trie,
      VOCAB,
      queries,
      query_emb=query_emb,
      hybrid_weight=1e4,
      order_by_similarity=False,
      **kw,
    )
  )
  by_sim = jax.device_get(
    search.constrained_search(
      params, CFG, trie, VOCAB, queries, query_emb=query_emb, hybrid_weight=1e4, **kw
    )
  )
  for q in range(2):
    assert set(by_id.item_ids[q]) == set(plain.item_ids[q])  # the same B images, re-ranked
    assert 42 not in plain.item_ids[q] and 42 not in by_id.item_ids[q]
  # The host twin (evaluate chooses the weight with it) gives the device's ranking.
  sim = hybrid.candidate_similarities(plain.item_ids, query_emb, image_ids, emb)
  np.testing.assert_array_equal(
    hybrid.rerank(plain.item_ids, plain.scores, sim, 1e4), by_id.item_ids
  )
  # Ordered by similarity, the group's best match 42 is reachable (and wins at this weight).
  assert by_sim.item_ids[:, 0].tolist() == [42, 42]
