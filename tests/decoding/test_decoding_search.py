"""constrained_search on a tiny random T5: exactness when nothing is pruned (checked against
teacher-forced `t5.score`), the restricted normalisation, renormalisation, the unconstrained
path, batch/model sharding on 8 fake devices, and argument errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CompileCounter, tiny_t5, tiny_t5_params

from avg_jax import partitioning
from avg_jax.decoding import search
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import VokenTrie
from avg_jax.errors import UserError
from avg_jax.models import t5 as t5_lib
from avg_jax.vokens import VokenVocabulary

# The decoding tests' shared tiny model (tests/helpers.py): P = 3, sizes (4, 4, 3), 32 voken
# rows; one layer per stack (the decoder's per-layer cache is checked in test_t5_decode.py).
VOCAB, CFG = tiny_t5()


@pytest.fixture(scope="module")
def params():
  # Larger embeddings make the output distribution peaked enough for rankings to matter.
  return tiny_t5_params(CFG)


def _queries(seed=0, batch=4, length=6):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, VOCAB.text_vocab_size, (batch, length)).astype(np.int32)
  tokens[1, 4:] = 0
  return tokens


def _trie(seed=0, n=10):
  rng = np.random.default_rng(seed)
  sizes = VOCAB.position_sizes()
  codes = np.unique(np.stack([rng.integers(0, s, 40) for s in sizes], 1), axis=0)[:n]
  return VokenTrie.build(codes, np.arange(len(codes)) + 50, sizes)


_score = jax.jit(t5_lib.score, static_argnums=1)
_logits = jax.jit(t5_lib.logits, static_argnums=1)


def _teacher_forced(params, queries, codes, restrict=False):
  """[B, n] summed log-probs of every identifier (vokens + EOS) for every query."""
  targets = VOCAB.target_tokens(codes)  # [n, P + 1]
  b, n = queries.shape[0], len(codes)
  inputs = np.repeat(queries, n, axis=0)
  tgt = np.tile(targets, (b, 1))
  if not restrict:
    return np.asarray(_score(params, CFG, inputs, tgt)).reshape(b, n)
  logits = _logits(params, CFG, inputs, tgt)  # [b*n, P+1, V]
  columns = t5_lib.voken_logit_token_ids(CFG)
  lp = jax.nn.log_softmax(logits[..., columns], axis=-1)
  col = np.asarray(t5_lib.tokens_to_voken_columns(CFG, tgt))
  return np.asarray(jnp.take_along_axis(lp, col[..., None], -1)[..., 0].sum(-1)).reshape(b, n)


@pytest.mark.parametrize("restrict", [False, True])
def test_exact_when_beams_cover_all_leaves(params, restrict):
  # With beam >= number of leaves nothing is pruned: the result is every indexed image ranked
  # by its teacher-forced score, with the reference's (full-vocabulary) normalisation, or the
  # documented restricted one with voken_logits_only.
  trie = _trie()
  queries = _queries()
  r = search.results_to_numpy(
    search.constrained_search(
      params,
      CFG,
      trie.to_device(),
      VOCAB,
      queries,
      beam_size=trie.num_leaves,
      voken_logits_only=restrict,
    )
  )
  expect = _teacher_forced(params, queries, trie.leaf_codes(), restrict)
  for q in range(len(queries)):
    order = np.argsort(-expect[q], kind="stable")
    assert r["item_ids"][q].tolist() == trie.leaf_first_items()[order].tolist()
    np.testing.assert_allclose(r["scores"][q], expect[q][order], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r["codes"][q], trie.leaf_codes()[order])


def test_restricted_normalisation_differs_from_full(params):
  # Guards the test above: the two normalisations really are different numbers.
  trie = _trie()
  full = _teacher_forced(params, _queries(), trie.leaf_codes(), False)
  restricted = _teacher_forced(params, _queries(), trie.leaf_codes(), True)
  assert (restricted > full + 1e-3).all()


def test_renormalize_mode_scores(params):
  trie = _trie(seed=1)
  queries = _queries(1)
  r = search.results_to_numpy(
    search.constrained_search(
      params, CFG, trie, VOCAB, queries, beam_size=4, top_k=3, mask_mode="renormalize"
    )
  )
  assert r["scores"].shape == (4, 3)
  # score = sum over positions of log-softmax restricted to the allowed children (EOS: 0)
  for q in range(len(queries)):
    targets = VOCAB.target_tokens(r["codes"][q])
    logits = np.asarray(_logits(params, CFG, np.repeat(queries[q : q + 1], 3, 0), targets))
    for j, codes in enumerate(r["codes"][q]):
      total = 0.0
      for pos in range(VOCAB.id_length):
        allowed = trie.children(codes[:pos]) + VOCAB.position_offsets()[pos]
        row = logits[j, pos].astype(np.float64)
        total += row[targets[j, pos]] - np.logaddexp.reduce(row[allowed])
      np.testing.assert_allclose(r["scores"][q, j], total, rtol=1e-5, atol=1e-5)
    assert (np.diff(r["scores"][q]) <= 0).all()


def test_unconstrained_equals_full_trie_and_returns_no_ids(params):
  sizes = VOCAB.position_sizes()
  every = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1)
  full = VokenTrie.build(every.reshape(-1, len(sizes)), None, sizes)
  queries = _queries(2)
  kw = dict(beam_size=5)
  a = search.results_to_numpy(search.constrained_search(params, CFG, full, VOCAB, queries, **kw))
  b = search.results_to_numpy(search.constrained_search(params, CFG, None, VOCAB, queries, **kw))
  np.testing.assert_array_equal(a["codes"], b["codes"])
  np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-6)
  assert (b["item_ids"] == -1).all() and (a["item_ids"] >= 0).all()


def test_sharded_search_matches_single_device(params):
  assert jax.device_count() == 8
  mesh = partitioning.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  shardings = t5_lib.param_shardings(CFG, mesh)["params"]
  sharded_params = jax.device_put(params, shardings)
  trie = _trie(seed=2)
  queries = _queries(3, batch=8)
  fn = search.make_search_fn(CFG, VOCAB, mesh, shardings, DecodeConfig(beam_size=3, top_k=3))
  dev_trie = trie.to_device(sharding=partitioning.replicated(mesh))
  got = fn(
    sharded_params, dev_trie, jax.device_put(queries, partitioning.logical_sharding(mesh, "batch"))
  )
  assert not got.item_ids.sharding.is_fully_replicated
  want = search.constrained_search(params, CFG, trie, VOCAB, queries, beam_size=3)
  got, want = search.results_to_numpy(got), search.results_to_numpy(want)
  np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
  np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-5)

  # Built again with equal settings (evaluate does, per method and protocol): the compiled
  # program is reused; other settings compile their own.
  tokens = jax.device_put(queries, partitioning.logical_sharding(mesh, "batch"))
  again = partitioning.make_mesh({"data": 4, "fsdp": 1, "model": 2})
  with CompileCounter() as compiles:
    fn2 = search.make_search_fn(
      CFG,
      VOCAB,
      again,
      t5_lib.param_shardings(CFG, again)["params"],
      DecodeConfig(beam_size=3, top_k=3),
    )
    np.testing.assert_array_equal(
      search.results_to_numpy(fn2(sharded_params, dev_trie, tokens))["item_ids"], got["item_ids"]
    )
    # Settings the program never reads (DecodeConfig.program) share it too.
    unread = DecodeConfig(
      beam_size=3, top_k=3, batch_size=8, hybrid_query="generator", dense_levels=0
    )
    for decode in (unread, dataclasses.replace(unread, tie_break="image_id")):
      fn3 = search.make_search_fn(CFG, VOCAB, mesh, shardings, decode)
      np.testing.assert_array_equal(
        search.results_to_numpy(fn3(sharded_params, dev_trie, tokens))["item_ids"],
        got["item_ids"],
      )
  assert compiles.count == 0
  with CompileCounter() as compiles:
    search.make_search_fn(CFG, VOCAB, mesh, shardings, DecodeConfig(beam_size=3, top_k=2))(
      sharded_params, dev_trie, tokens
    )
  assert compiles.count == 1


def test_argument_errors(params):
  queries = _queries()
  wrong_sizes = VokenTrie.build([[0, 0, 0]], None, (4, 4, 4))
  with pytest.raises(UserError, match="position sizes"):
    search.constrained_search(params, CFG, wrong_sizes, VOCAB, queries, beam_size=2)
  other_vocab = VokenVocabulary(21, 4, 2, shared_codebook=True, disambiguation_size=3)
  with pytest.raises(UserError, match="does not match the voken vocabulary"):
    search.constrained_search(params, CFG, _trie(), other_vocab, queries, beam_size=2)
  with pytest.raises(UserError, match="top_k"):  # checked once, by DecodeConfig
    search.constrained_search(params, CFG, _trie(), VOCAB, queries, beam_size=2, top_k=0)
  with pytest.raises(UserError, match="mask_mode"):
    search.constrained_search(params, CFG, _trie(), VOCAB, queries, beam_size=2, mask_mode="x")
  with pytest.raises(UserError, match=r"\[batch, length\]"):
    search.constrained_search(params, CFG, _trie(), VOCAB, queries[0], beam_size=2)


def test_input_tokens_are_checked_on_the_host(params):
  queries, trie = _queries(), _trie()

  def run(tokens):
    return search.constrained_search(params, CFG, trie, VOCAB, tokens, beam_size=4, top_k=2)

  v = CFG.vocab_size
  for bad, message in [
    (v, rf"token id {v} is outside the vocabulary \[0, {v}\)"),
    (-1, r"token id -1 is outside the vocabulary"),
    (v + 1000, rf"token id {v + 1000} is outside"),
  ]:
    tokens = queries.copy()
    tokens[2, 1] = bad
    with pytest.raises(UserError, match=message):
      run(tokens)
    with pytest.raises(UserError, match=message):  # device arrays too
      run(jnp.asarray(tokens))
  for dtype in (np.float32, np.float64, np.bool_):
    with pytest.raises(UserError, match=rf"integer token ids, got dtype {np.dtype(dtype)}"):
      run(queries.astype(dtype))
  with pytest.raises(UserError, match="integer token ids, got dtype float"):
    run([[3.0, 4.0]])
  with pytest.raises(UserError, match="rows of different lengths"):
    run([[3, 4, 5], [3]])
  with pytest.raises(UserError, match="integer array"):
    run("a red circle")
  # A list of lists and other integer dtypes give the same result as int32 arrays.
  want = search.results_to_numpy(run(queries))
  for tokens in (queries.tolist(), queries.astype(np.int64), queries.astype(np.uint16)):
    got = search.results_to_numpy(run(tokens))
    np.testing.assert_array_equal(got["item_ids"], want["item_ids"])
    np.testing.assert_array_equal(got["scores"], want["scores"])
