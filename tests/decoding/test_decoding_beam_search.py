"""Model-agnostic beam search: a hand-computed toy, properties against a loop reference,
bad input and batch sharding. The "models" are fixed tables of logits, indexed by the query
and the last token, so expected answers can be worked out by hand or by brute force."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from avg_jax import partitioning
from avg_jax.decoding import beam_search as bs
from avg_jax.decoding.trie import Unconstrained, VokenTrie
from avg_jax.errors import UserError


def table_step(tokens, cache):
  """tokens [n] -> (logits [n, V], cache): row `table[query, last_token]`."""
  (table,) = cache
  return jnp.take_along_axis(table, tokens[:, None, None], axis=1)[:, 0], cache


@functools.partial(
  jax.jit,
  static_argnames=("beam_size", "top_k", "token_offsets", "mask_mode", "unconstrained", "sizes"),
)
def run(
  table,
  dev_trie,
  *,
  beam_size,
  token_offsets,
  mask_mode="after_softmax",
  top_k=None,
  unconstrained=False,
  sizes=None,
):
  constraint = Unconstrained(sizes) if unconstrained else dev_trie
  return bs.beam_search(
    table_step,
    (table,),
    constraint,
    batch_size=table.shape[0],
    beam_size=beam_size,
    top_k=top_k,
    token_offsets=token_offsets,
    eos_id=1,
    mask_mode=mask_mode,
  )


def numpy_beam_search(
  logprob_fn, allowed, *, beam_size, sizes, token_offsets, eos_id=1, mask_mode="after_softmax"
):
  """Independent loop reference for one query: [(score, codes)] best first.

  `logprob_fn(last_token) -> float64[V]` full-vocabulary log-probs; `allowed`: set of code
  tuples or None (everything). Ties: beam rank, then code.
  """
  prefixes = None
  if allowed is not None:
    prefixes = {s[:n] for s in allowed for n in range(len(sizes) + 1)}
  beams = [(0.0, (), 0)]  # score, codes, last token
  for level, size in enumerate(sizes):
    cands = []
    for rank, (score, codes, last) in enumerate(beams):
      lp = logprob_fn(last)
      kids = [c for c in range(size) if prefixes is None or codes + (c,) in prefixes]
      vals = np.array([lp[token_offsets[level] + c] for c in kids])
      if mask_mode == "renormalize" and kids:
        vals = vals - np.logaddexp.reduce(vals)
      for c, v in zip(kids, vals):
        cands.append((score + v, rank, c, codes + (c,), token_offsets[level] + c))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    beams = [(s, codes, tok) for s, _, _, codes, tok in cands[:beam_size]]
  final = [
    (s + (0.0 if mask_mode == "renormalize" else logprob_fn(last)[eos_id]), rank, c)
    for rank, (s, c, last) in enumerate(beams)
  ]
  final.sort(key=lambda t: (-t[0], t[1]))
  return [(s, c) for s, _, c in final]


# --- the hand-computed toy ---------------------------------------------------------------------
# Vocabulary: 0 pad (decoder start), 1 EOS, 2 = code 0, 3 = code 1; P = 2, K = 2.
# Rows of probabilities by last token:   pad  eos  c0   c1
TOY_PROBS = np.array(
  [
    [0.1, 0.1, 0.5, 0.3],  # after the start token
    [0.1, 0.1, 0.5, 0.3],  # (after EOS: unused)
    [0.1, 0.2, 0.3, 0.4],  # after c0
    [0.5, 0.1, 0.3, 0.1],
  ]
)  # after c1
TOY_TABLE = jnp.asarray(np.log(TOY_PROBS)[None], jnp.float32)  # [1, 4, 4]; log_softmax = log p


@pytest.mark.parametrize("dense_levels", [0, 1, 2])
def test_toy_by_hand(dense_levels):
  # Full trie {00, 01, 10, 11}, beam 2. Step 0: c0 .5, c1 .3. Step 1: 00 .15, 01 .2, 10 .09,
  # 11 .03 -> keep 01 (.2), 00 (.15). EOS: 01 * .1 = .02, 00 * .2 = .03: EOS flips the order.
  full = VokenTrie.build([[0, 0], [0, 1], [1, 0], [1, 1]], [10, 11, 12, 13], (2, 2))
  r = run(TOY_TABLE, full.to_device(dense_levels), beam_size=2, token_offsets=(2, 2))
  assert r.codes.tolist() == [[[0, 0], [0, 1]]]
  np.testing.assert_allclose(np.exp(r.scores), [[0.03, 0.02]], rtol=1e-5)
  assert full.to_device(dense_levels).leaf_item[r.leaf].tolist() == [[10, 11]]

  # Trie {01, 10, 11} (ids 7, 5, 9). Step 1: "0" has one child: 01 .2; "1": 10 .09, 11 .03.
  # Keep 01, 10. EOS: 01 -> .02, 10 -> .09 * .2 = .018.
  trie = VokenTrie.build([[0, 1], [1, 0], [1, 1]], [7, 5, 9], (2, 2))
  dev = trie.to_device(dense_levels)
  r = run(TOY_TABLE, dev, beam_size=2, token_offsets=(2, 2))
  assert r.codes.tolist() == [[[0, 1], [1, 0]]]
  np.testing.assert_allclose(np.exp(r.scores), [[0.02, 0.018]], rtol=1e-5)
  assert dev.leaf_item[r.leaf].tolist() == [[7, 5]]
  assert r.valid.tolist() == [[True, True]]

  # Renormalised over allowed children: step 0 c0 .5/.8 = .625, c1 .375; step 1 "0" -> 01
  # .625 * 1; "1" -> 10 .375 * .75 = .28125, 11 .09375. EOS adds log 1.
  r = run(TOY_TABLE, dev, beam_size=2, token_offsets=(2, 2), mask_mode="renormalize")
  assert r.codes.tolist() == [[[0, 1], [1, 0]]]
  np.testing.assert_allclose(np.exp(r.scores), [[0.625, 0.28125]], rtol=1e-5)

  # Greedy (beam 1): c0 (.5), then its only child c1 (.2), EOS .1 -> .02.
  r = run(TOY_TABLE, dev, beam_size=1, token_offsets=(2, 2))
  assert r.codes.tolist() == [[[0, 1]]]
  np.testing.assert_allclose(np.exp(r.scores), [[0.02]], rtol=1e-5)

  # More beams than leaves: the 3 sequences, then an explicit invalid slot.
  # 11: .3 * .1 * .1 = .003.
  r = run(TOY_TABLE, dev, beam_size=4, token_offsets=(2, 2))
  assert r.codes.tolist() == [[[0, 1], [1, 0], [1, 1], [-1, -1]]]
  np.testing.assert_allclose(np.exp(r.scores[0, :3]), [0.02, 0.018, 0.003], rtol=1e-5)
  assert r.scores[0, 3] == -np.inf and r.leaf[0, 3] == -1
  assert r.valid.tolist() == [[True, True, True, False]]

  # top_k < beam: the best k of the final beams.
  r = run(TOY_TABLE, dev, beam_size=3, top_k=1, token_offsets=(2, 2))
  assert r.codes.tolist() == [[[0, 1]]]


def test_zero_probability_tokens_are_never_returned():
  # After c0 the model gives c1 probability 0: sequence 01 must not come back, even though
  # beams are left over.
  probs = TOY_PROBS.copy()
  probs[2] = [0.1, 0.2, 0.7, 0.0]
  with np.errstate(divide="ignore"):
    table = jnp.asarray(np.log(probs)[None], jnp.float32)
  trie = VokenTrie.build([[0, 1], [1, 0]], None, (2, 2))
  r = run(table, trie.to_device(1), beam_size=2, token_offsets=(2, 2))
  assert r.codes.tolist() == [[[1, 0], [-1, -1]]]
  assert r.valid.tolist() == [[True, False]]
  assert np.isfinite(r.scores[0, 0]) and r.scores[0, 1] == -np.inf


def _random_case(seed, sizes, n_seqs, batch=3):
  rng = np.random.default_rng(seed)
  offsets = tuple(int(2 + sum(sizes[:i])) for i in range(len(sizes)))  # per-position rows
  vocab = 2 + sum(sizes) + 2  # plus two "text" tokens that are never allowed
  table = (rng.standard_normal((batch, vocab, vocab)) * 2).astype(np.float32)
  all_seqs = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(
    -1, len(sizes)
  )
  chosen = all_seqs[rng.permutation(len(all_seqs))[:n_seqs]]
  return table, offsets, chosen


def _reference(table, q, allowed, beam, sizes, offsets, mask_mode):
  rows = table[q].astype(np.float64)
  logp = rows - np.logaddexp.reduce(rows, axis=-1, keepdims=True)
  return numpy_beam_search(
    lambda t: logp[t],
    allowed,
    beam_size=beam,
    sizes=sizes,
    token_offsets=offsets,
    mask_mode=mask_mode,
  )


@pytest.mark.parametrize(
  "seed,sizes,n_seqs,beam,mask_mode,dense",
  [
    (0, (3, 3, 3), 9, 3, "after_softmax", 1),
    (1, (3, 3, 3), 5, 4, "after_softmax", 0),  # beams may outnumber candidates
    (2, (4, 3, 2), 12, 5, "renormalize", 1),  # a smaller last position (disambiguation)
    (3, (2, 4, 3), 20, 1, "after_softmax", 2),
    (4, (5, 5), 7, 5, "renormalize", 0),
  ],
)
def test_matches_loop_reference(seed, sizes, n_seqs, beam, mask_mode, dense):
  table, offsets, chosen = _random_case(seed, sizes, n_seqs)
  trie = VokenTrie.build(chosen, None, sizes)
  r = jax.device_get(
    run(
      jnp.asarray(table),
      trie.to_device(dense),
      beam_size=beam,
      token_offsets=offsets,
      mask_mode=mask_mode,
    )
  )
  allowed = {tuple(s) for s in chosen.tolist()}
  for q in range(table.shape[0]):
    expect = _reference(table, q, allowed, beam, sizes, offsets, mask_mode)
    got_codes = [tuple(c) for c, v in zip(r.codes[q].tolist(), r.valid[q]) if v]
    assert got_codes == [c for _, c in expect]
    np.testing.assert_allclose(r.scores[q, : len(expect)], [s for s, _ in expect], rtol=1e-5)
    assert all(c in allowed for c in got_codes)
    valid_scores = r.scores[q][r.valid[q]]
    assert (np.diff(valid_scores) <= 0).all()  # best first
    assert not r.valid[q, len(expect) :].any()
    assert (r.scores[q, len(expect) :] == -np.inf).all()
    # leaves point back at the returned sequences
    leaf_codes = trie.leaf_codes()
    for c, leaf in zip(got_codes, r.leaf[q]):
      assert tuple(leaf_codes[leaf]) == c


@pytest.mark.parametrize("mask_mode", ["after_softmax", "renormalize"])
def test_full_trie_equals_unconstrained(mask_mode):
  sizes = (3, 3, 3)
  table, offsets, all_seqs = _random_case(7, sizes, 27, batch=4)
  trie = VokenTrie.build(all_seqs, None, sizes)
  kw = dict(beam_size=4, token_offsets=offsets, mask_mode=mask_mode)
  constrained = jax.device_get(run(jnp.asarray(table), trie.to_device(1), **kw))
  free = jax.device_get(run(jnp.asarray(table), None, unconstrained=True, sizes=sizes, **kw))
  np.testing.assert_array_equal(constrained.codes, free.codes)
  np.testing.assert_allclose(constrained.scores, free.scores, rtol=1e-6)
  # and both agree with the loop reference without constraint
  for q in range(4):
    expect = _reference(table, q, None, 4, sizes, offsets, mask_mode)
    assert [tuple(c) for c in free.codes[q].tolist()] == [c for _, c in expect]


def test_ties_are_broken_by_beam_rank_then_code():
  # Every row uniform: all sequences tie; the result must be the lexicographically first
  # sequences, in order, every time.
  table = jnp.zeros((1, 8, 8), jnp.float32)
  trie = VokenTrie.build([[a, b] for a in range(3) for b in range(3)], None, (3, 3))
  r = run(table, trie.to_device(1), beam_size=4, token_offsets=(2, 5))
  assert r.codes.tolist() == [[[0, 0], [0, 1], [0, 2], [1, 0]]]


def test_bad_arguments_are_user_errors():
  trie = VokenTrie.build([[0, 1]], None, (2, 2)).to_device(1)
  kw = dict(batch_size=1, token_offsets=(2, 2), eos_id=1)
  with pytest.raises(UserError, match="mask_mode"):
    bs.beam_search(table_step, (TOY_TABLE,), trie, beam_size=2, mask_mode="before", **kw)
  with pytest.raises(UserError, match="top_k"):
    bs.beam_search(table_step, (TOY_TABLE,), trie, beam_size=2, top_k=3, **kw)
  with pytest.raises(UserError, match="beam_size"):
    bs.beam_search(table_step, (TOY_TABLE,), trie, beam_size=0, **kw)
  with pytest.raises(UserError, match="token offsets"):
    bs.beam_search(
      table_step, (TOY_TABLE,), trie, beam_size=1, batch_size=1, token_offsets=(2,), eos_id=1
    )


def test_batch_sharded_search_matches_single_device():
  assert jax.device_count() == 8
  sizes = (4, 4, 4)
  table, offsets, chosen = _random_case(11, sizes, 30, batch=8)
  trie = VokenTrie.build(chosen, None, sizes)
  mesh = partitioning.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  batch_sharding = partitioning.logical_sharding(mesh, "batch")
  replicated = NamedSharding(mesh, PartitionSpec())
  dev_trie = trie.to_device(1, sharding=replicated)
  kw = dict(beam_size=3, token_offsets=offsets)

  def fn(table, dev_trie):
    return bs.beam_search(table_step, (table,), dev_trie, batch_size=8, eos_id=1, **kw)

  with partitioning.activation_context(mesh):
    sharded_fn = jax.jit(
      fn, in_shardings=(batch_sharding, replicated), out_shardings=batch_sharding
    )
    sharded = sharded_fn(jax.device_put(jnp.asarray(table), batch_sharding), dev_trie)
  assert not sharded.scores.sharding.is_fully_replicated
  assert len(sharded.scores.addressable_shards) == 8
  assert sharded.scores.addressable_shards[0].data.shape == (1, 3)
  single = run(jnp.asarray(table), trie.to_device(1), **kw)
  np.testing.assert_array_equal(jax.device_get(sharded.codes), jax.device_get(single.codes))
  np.testing.assert_allclose(
    jax.device_get(sharded.scores), jax.device_get(single.scores), rtol=1e-6
  )
