"""Retrieval as constrained generation: T5 + voken trie + beam search, one compiled program.

The search program (`run_search`; settings: one `DecodeConfig`, its static argument) encodes
each query once, computes the cross-attention keys/values once (`t5.init_decode_state`) and
runs `beam_search.beam_search` over `t5.decode_step`: the first step on one row per query,
the others on `batch * beam` rows. Only the self-attention cache
is expanded to the beams and reordered by beam gathers; the cross-attention K/V and encoder
mask are the same for every beam of a query, so they are kept once per query and the beams
of a query attend to them together (`grouped_step`).

Normalisation of the scores (`voken_logits_only`):
  False (default, the reference): the decoder's output projection covers the whole
      vocabulary, log_softmax runs over all of it, and a result's score is the sum of the
      full-vocabulary log-probs of its P vokens and EOS (Hugging Face's `sequences_scores`
      times P + 1).
  True: the output projection covers only EOS and the voken rows (`t5.decode_step(...,
      voken_logits_only=True)`), and log_softmax runs over those `1 + num_voken_tokens`
      columns. Every score is then the log-prob under a model whose text tokens are removed
      from the output distribution: each step's log-prob is larger by
      `-log(1 - p_text)`, where p_text is the full model's probability of any text token at
      that step. For a model trained on voken targets p_text is tiny and rankings rarely
      change, but they are not guaranteed to match the reference.
`mask_mode="renormalize"` further renormalises over the trie's allowed children.

Identifiers and ties (`decode.tie_break`, avg_jax/decoding/config.py). The trie's identifiers
are either the full identifiers (semantic codes + disambiguation position; "learned": the
generator was trained to emit the disambiguation token and scores it) or the semantic codes
alone ("similarity", "image_id": a leaf then holds every indexed image with those codes). The
search runs over the trie's P positions, then EOS when the generator was trained to stop
there (`trained_length == P`; a search over the semantic prefix of a generator trained on full
identifiers stops without EOS). The best `top_k` leaves are then expanded into their images,
leaf by leaf in score order: within a leaf by cosine similarity of `query_emb` and the images'
embeddings (`trie.item_emb`) when both are given, else by image id. Every image of a leaf gets
the leaf's score, so no untrained logit decides between images that share their codes.
`SearchResult.sequences` are the leaves themselves: the generated code sequences, best first
(the paper's code-level results).
"""

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax import partitioning
from avg_jax.decoding import beam_search as beam_lib
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import DeviceTrie, Unconstrained, VokenTrie
from avg_jax.decoding.union_trie import UnionTrie
from avg_jax.errors import UserError
from avg_jax.models import query_head as query_head_lib
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import EOS_ID, VokenVocabulary

# Cache entries that are identical across the beams of one query: never reordered.
BEAM_INVARIANT = frozenset({"cross_k", "cross_v", "encoder_mask", "index"})


class SearchResult(NamedTuple):
  """Top-k per query, best first. Unfilled slots: id -1, score -inf, codes -1."""

  item_ids: jax.Array  # [B, k] int32 (-1 without a trie: unconstrained search)
  scores: jax.Array  # [B, k] float32 summed log-probs of the P vokens (and EOS)
  codes: jax.Array  # [B, k, P] int32: each result's identifier (its leaf)
  sequences: jax.Array  # [B, k, P] int32: the k best generated leaves (distinct sequences)


def _check(
  cfg: T5Config, trie: Any, vocab: VokenVocabulary, input_tokens, trained_length: int
) -> None:
  if cfg.vocab_size != vocab.total_vocab_size or cfg.first_voken_id != vocab.first_voken_id:
    raise UserError(
      f"search: the T5 vocabulary ({cfg.vocab_size} rows, vokens from "
      f"{cfg.first_voken_id}) does not match the voken vocabulary "
      f"({vocab.total_vocab_size} rows, vokens from {vocab.first_voken_id})"
    )
  if trained_length not in (vocab.num_levels, vocab.id_length):
    raise UserError(
      f"search: trained_length must be {vocab.num_levels} (semantic codes) or "
      f"{vocab.id_length} (full identifiers), got {trained_length}"
    )
  sizes = tuple(vocab.position_sizes())
  if trie is not None and (
    trie.id_length > trained_length or tuple(trie.position_sizes) != sizes[: trie.id_length]
  ):
    raise UserError(
      f"search: the trie's position sizes {list(trie.position_sizes)} do not "
      f"match the first {trained_length} of the voken vocabulary's {list(sizes)}"
    )
  if len(input_tokens.shape) != 2:
    raise UserError(f"search: input tokens must be [batch, length], got {list(input_tokens.shape)}")


def split_cache(cache: dict) -> tuple[dict, dict]:
  """`(carried, fixed)` of a decoding cache: the entries a beam search carries per beam, and
  those it keeps once per query (cross-attention K/V, encoder mask; see `grouped_step`)."""
  fixed = {k: v for k, v in cache.items() if k in BEAM_INVARIANT and k != "index"}
  return {k: v for k, v in cache.items() if k not in fixed}, fixed


def _reorder_cache(cache: dict, parent: jax.Array, batch: int, beams: int) -> dict:
  out = {}
  for key, value in cache.items():
    out[key] = (
      value if key in BEAM_INVARIANT else beam_lib.gather_beams(value, parent, batch, beams)
    )
  return out


def grouped_step(
  params, cfg: T5Config, tokens, state: dict, fixed: dict, batch: int, voken_logits_only: bool
):
  """`t5.decode_step` for `tokens [B * beam]` whose beams share one copy of `fixed [B, ...]`.

  `jax.vmap` over the B queries; inside, `state` leaves are `[beam, ...]` and `fixed` leaves
  `[1, ...]`, which T5's attention einsums broadcast over the beams. Each query's beams then
  attend to its cross-attention K/V as one `[beam, kv] x [kv, length]` matmul, instead of
  `beam` copies of the K/V, each transposed and used for a 1-row matmul (measured 2-3x faster
  per step for the small benchmark model). Inside, the logical "batch" axis (the beams of one
  query) is left unsharded; the vmapped query axis keeps its sharding from the inputs.
  """
  rows = tokens.shape[0]
  per_query = lambda x: x.reshape((batch, rows // batch) + x.shape[1:])

  def one_query(tok, st, fx):
    logits, new_cache = t5_lib.decode_step(
      params, cfg, tok, dict(st, **fx), voken_logits_only=voken_logits_only
    )
    return logits, {k: new_cache[k] for k in st}

  rules = tuple(
    (name, None if name == "batch" else axes) for name, axes in nn.get_logical_axis_rules()
  )
  with nn.logical_axis_rules(rules):
    logits, new_state = jax.vmap(one_query)(
      per_query(tokens), jax.tree.map(per_query, state), jax.tree.map(lambda x: x[:, None], fixed)
    )
  flat = lambda x: x.reshape((rows,) + x.shape[2:])
  return flat(logits), jax.tree.map(flat, new_state)


def expand_leaves(
  trie: DeviceTrie,
  leaf: jax.Array,
  scores: jax.Array,
  top_k: int,
  query_emb: jax.Array | None = None,
  *,
  order_by_similarity: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
  """The best `top_k` items of the ranked leaves `leaf int32[B, n]` (-1: none), leaf by leaf.

  Within a leaf, items are ordered by cosine similarity to `query_emb float[B, D]` when it and
  `trie.item_emb` are given and `order_by_similarity`, else by id. -> `(item ids int32[B,
  top_k], scores float32[B, k] (their leaf's), rank of their leaf int32[B, k], their
  similarity float32[B, k] (None without `query_emb`))`; missing slots: -1, -inf, -1, -inf.
  """
  b, n = jax.tree.leaves(leaf)[0].shape
  with_similarity = query_emb is not None and trie.item_emb is not None
  by_similarity = with_similarity and order_by_similarity
  # In id order only a leaf's first top_k images can be results (so the cost is bounded by
  # k, whatever the size of the largest group); by similarity any can.
  width = trie.max_group if by_similarity else min(trie.max_group, top_k)
  items, valid, emb = trie.members(leaf, width, with_similarity)  # [B, n, G]
  width = items.shape[-1]
  if with_similarity:
    assert query_emb is not None  # with_similarity requires it
    q = query_emb.astype(jnp.float32)
    q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    sim = jnp.einsum("bd,bngd->bng", q, emb)  # [B, n, G]
  if by_similarity:
    # Stable: equal similarities keep id order; invalid slots go last.
    order = jnp.argsort(jnp.where(valid, -sim, jnp.inf), axis=-1, stable=True)
    items = jnp.take_along_axis(items, order, axis=-1)
    valid = jnp.take_along_axis(valid, order, axis=-1)
    sim = jnp.take_along_axis(sim, order, axis=-1)
  elif not with_similarity:
    sim = jnp.zeros(items.shape, jnp.float32)
  leaf_rank = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None, :, None], items.shape)
  flat = lambda x: x.reshape(b, n * width)
  items, valid, leaf_rank, sim = flat(items), flat(valid), flat(leaf_rank), flat(sim)
  if n * width < top_k:  # fewer slots than results: pad with invalid ones
    pad = lambda x, v: jnp.pad(x, ((0, 0), (0, top_k - n * width)), constant_values=v)
    items, valid, leaf_rank = pad(items, -1), pad(valid, False), pad(leaf_rank, 0)
    sim = pad(sim, 0.0)
  # The first top_k valid slots in (leaf rank, within-leaf order): a stable sort of validity.
  take = jnp.argsort(~valid, axis=-1, stable=True)[:, :top_k]
  got = jnp.take_along_axis(valid, take, axis=-1)
  rank = jnp.where(got, jnp.take_along_axis(leaf_rank, take, axis=-1), -1)
  item_ids = jnp.where(got, jnp.take_along_axis(items, take, axis=-1), -1)
  out_scores = jnp.where(got, jnp.take_along_axis(scores, jnp.maximum(rank, 0), axis=-1), -jnp.inf)
  out_sim = jnp.where(got, jnp.take_along_axis(sim, take, axis=-1), -jnp.inf)
  return item_ids, out_scores, rank, (out_sim if with_similarity else None)


def hybrid_rescore(
  item_ids: jax.Array, scores: jax.Array, sim: jax.Array, weight: float, top_k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`avg_hybrid`: re-ranks the beam's images `[B, n]` by `score + weight * similarity` (the
  generator's log-prob and the dual encoder's cosine; missing slots stay last) and keeps
  `top_k`. -> `(item ids, fused scores, positions in the input [B, top_k])`."""
  fused = jnp.where(item_ids >= 0, scores + weight * sim, -jnp.inf)
  order = jnp.argsort(-fused, axis=-1, stable=True)[:, :top_k]
  take = lambda x: jnp.take_along_axis(x, order, axis=-1)
  return take(item_ids), take(fused), order


def _search(
  params,
  trie,
  input_tokens,
  query_emb=None,
  query_head=None,
  *,
  cfg: T5Config,
  vocab: VokenVocabulary,
  decode: DecodeConfig,
) -> SearchResult:
  beam_size, top_k = decode.beam, decode.top_k
  voken_logits_only, hybrid_weight = decode.voken_logits_only, decode.hybrid_weight
  trained_length = trained_length_of(decode, vocab)
  batch = input_tokens.shape[0]
  p = trie.id_length if trie is not None else vocab.id_length
  input_tokens = input_tokens.astype(jnp.int32)
  encoded = t5_lib.encode(params, cfg, input_tokens)  # [B, S, D]
  if query_emb is None and query_head is not None:
    # The generator's own query embedding (models/query_head.py): no second text tower.
    query_emb = query_head_lib.predict(
      query_head, query_head_lib.pooled_states(encoded, input_tokens)
    )
  # P + 1 positions are fed: the start token and the P vokens (EOS is predicted, not fed).
  cache = t5_lib.init_decode_state(params, cfg, encoded, input_tokens, p + 1)
  # Beam-invariant entries (cross-attention K/V, encoder mask) stay out of the loop state and
  # are never copied per beam: each query's beams attend to its one copy (see grouped_step).
  carried, fixed = split_cache(cache)

  def tokens_to_logits(tokens, state):
    if tokens.shape[0] == batch:  # step 0 (or beam 1): one row per query
      logits, new_cache = t5_lib.decode_step(
        params, cfg, tokens, dict(state, **fixed), voken_logits_only=voken_logits_only
      )
      return logits, {k: new_cache[k] for k in state}
    return grouped_step(params, cfg, tokens, state, fixed, batch, voken_logits_only)

  token_offsets = tuple(int(o) for o in vocab.position_offsets()[:p])
  if voken_logits_only:
    # Column 0 is EOS, column 1 + j is token first_voken_id + j (t5.voken_logit_token_ids).
    logit_offsets = tuple(o - vocab.first_voken_id + 1 for o in token_offsets)
    eos_logit_index = 0
  else:
    logit_offsets, eos_logit_index = token_offsets, EOS_ID
  constraint = Unconstrained(vocab.position_sizes()[:p]) if trie is None else trie
  hybrid = hybrid_weight is not None and trie is not None
  if hybrid and (query_emb is None or trie.item_emb is None):
    raise UserError(
      "search: hybrid re-scoring needs query embeddings and the index's image embeddings"
    )
  result = beam_lib.beam_search(
    tokens_to_logits,
    carried,
    constraint,
    batch_size=batch,
    beam_size=beam_size,
    top_k=beam_size if hybrid else top_k,
    token_offsets=token_offsets,
    eos_id=EOS_ID,
    logit_offsets=logit_offsets,
    eos_logit_index=eos_logit_index,
    mask_mode=decode.mask_mode,
    start_token=t5_lib.DECODER_START_ID,
    reorder_cache=functools.partial(_reorder_cache, batch=batch, beams=beam_size),
    emit_eos=p == trained_length,
  )
  if trie is None:
    item_ids = jnp.full(result.leaf.shape, -1, jnp.int32)
    return SearchResult(
      item_ids=item_ids, scores=result.scores, codes=result.codes, sequences=result.codes
    )
  if hybrid:
    # The beam's B images as the plain search would return them (within a leaf by the
    # tie-break), re-scored: B dot products, at most B images read per leaf, so the cost is
    # independent of N and of the size of the largest group of shared codes.
    item_ids, scores, rank, sim = expand_leaves(
      trie,
      result.leaf,
      result.scores,
      beam_size,
      query_emb,
      order_by_similarity=decode.order_by_similarity,
    )
    # hybrid implies a weight, and expand_leaves returns similarities when given query_emb.
    assert sim is not None and hybrid_weight is not None
    item_ids, scores, order = hybrid_rescore(item_ids, scores, sim, hybrid_weight, top_k)
    rank = jnp.where(item_ids >= 0, jnp.take_along_axis(rank, order, axis=-1), -1)
  else:
    item_ids, scores, rank, _ = expand_leaves(
      trie,
      result.leaf,
      result.scores,
      top_k,
      query_emb,
      order_by_similarity=decode.order_by_similarity,
    )
  codes = jnp.where(
    (rank >= 0)[..., None],
    jnp.take_along_axis(result.codes, jnp.maximum(rank, 0)[..., None], axis=1),
    -1,
  )
  return SearchResult(
    item_ids=item_ids, scores=scores, codes=codes, sequences=result.codes[:, :top_k]
  )


def _check_input_tokens(cfg: T5Config, input_tokens):
  """Host-side checks of `constrained_search`'s queries before the jitted call (inside it, an
  id >= V gathers nothing and a negative id wraps to another row, silently): a list or tuple
  becomes an array; the dtype must be integer; every id must be in [0, vocab_size); numpy
  input comes back as int32.
  Values of a traced array (under an outer jit) cannot be read and are left unchecked."""
  if isinstance(input_tokens, (list, tuple)):
    try:
      input_tokens = np.asarray(input_tokens)
    except ValueError as e:
      raise UserError(
        "search: input tokens must be a rectangular [batch, length] array of "
        "token ids (rows of different lengths?)"
      ) from e
  dtype = getattr(input_tokens, "dtype", None)
  if dtype is None or not hasattr(input_tokens, "shape"):
    raise UserError(
      f"search: input tokens must be an integer array [batch, length], got "
      f"{type(input_tokens).__name__}"
    )
  if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
    raise UserError(f"search: input tokens must be integer token ids, got dtype {dtype}")
  if isinstance(input_tokens, jax.core.Tracer) or not np.size(input_tokens):
    return input_tokens
  lo, hi = (int(x) for x in jax.device_get((input_tokens.min(), input_tokens.max())))
  if lo < 0 or hi >= cfg.vocab_size:
    bad = lo if lo < 0 else hi
    raise UserError(f"search: input token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
  if isinstance(input_tokens, np.ndarray) and input_tokens.dtype != np.int32:
    input_tokens = input_tokens.astype(np.int32)  # in range, so exact
  return input_tokens


def trained_length_of(decode: DecodeConfig, vocab: VokenVocabulary) -> int:
  """Identifier positions the generator emits before EOS: `decode.trained_length`, or the
  vocabulary's P when it is None."""
  return vocab.id_length if decode.trained_length is None else int(decode.trained_length)


def _check_trie_type(trie) -> None:
  if trie is not None and not isinstance(trie, (DeviceTrie, UnionTrie)):
    raise UserError(
      f"search: expected a VokenTrie, DeviceTrie, UnionTrie or None, got {type(trie).__name__}"
    )


def _search_program(
  cfg: T5Config,
  vocab: VokenVocabulary,
  decode: DecodeConfig,
  params,
  trie,
  input_tokens,
  query_emb=None,
  query_head=None,
) -> SearchResult:
  """The one search program: `cfg`, `vocab` and `decode` (validated by `DecodeConfig`) are
  static; the checks that need the trie and the queries run while tracing."""
  _check_trie_type(trie)
  _check(cfg, trie, vocab, input_tokens, trained_length_of(decode, vocab))
  return _search(
    params, trie, input_tokens, query_emb, query_head, cfg=cfg, vocab=vocab, decode=decode
  )


# One module-level function with the settings as static arguments: jit keys its cache on the
# function and the settings, so every search with equal settings (evaluate's avg and avg_ltr,
# both protocols, a re-evaluation, every Retriever query of one bucket) shares one compiled
# program. `make_search_fn` jits the same function with a mesh's shardings.
_search_jit = jax.jit(_search_program, static_argnums=(0, 1, 2))


def build_search(cfg: T5Config, vocab: VokenVocabulary, decode: DecodeConfig):
  """The search program every caller jits: `(params, trie, input_tokens [B, S], query_emb
  [B, D] | None, query_head | None) -> SearchResult` with `decode.beam` beams, `decode.top_k`
  results, and `decode.trained_length` positions before EOS (see `run_search`; its checks run
  while tracing). `run_search` jits it as it is, `make_search_fn` for a mesh, the
  ahead-of-time compile (avg_jax/aot) for a TPU topology."""
  return functools.partial(_search_program, cfg, vocab, decode)


def run_search(
  params,
  cfg: T5Config,
  trie: DeviceTrie | VokenTrie | UnionTrie | None,
  vocab: VokenVocabulary,
  input_tokens,
  decode: DecodeConfig,
  *,
  query_emb=None,
  query_head=None,
) -> SearchResult:
  """Top-k indexed images per query under `decode`: `input_tokens int[B, S]` (0 = padding)
  -> SearchResult with `item_ids int32[B, k]`, `scores float32[B, k]`, `codes int32[B, k, P]`.

  Compiled once per (shapes, trie widths, `cfg`, `vocab`, `decode`). `trie=None` searches
  every voken sequence (no constraint; item ids are -1). Arrays may be sharded: jit follows
  the inputs' shardings; `make_search_fn` pins them explicitly for a mesh. `query_emb
  float[B, D]`: orders images that share a leaf by similarity under the "similarity"
  tie-break (module docstring), and is avg_hybrid's query embedding (`decode.hybrid_weight`:
  re-rank the beam's images by log-prob + weight x similarity); `query_head`
  (`models.query_head.QueryHead`): without `query_emb`, the query embeddings are predicted
  from the generator's encoder inside the program.
  """
  input_tokens = _check_input_tokens(cfg, input_tokens)
  if isinstance(trie, VokenTrie):
    # Convenient for one-off calls; services should convert once with trie.to_device().
    trie = trie.to_device()
  _check_trie_type(trie)
  return _search_jit(cfg, vocab, decode.program, params, trie, input_tokens, query_emb, query_head)


def constrained_search(
  params,
  cfg: T5Config,
  trie: DeviceTrie | VokenTrie | UnionTrie | None,
  vocab: VokenVocabulary,
  input_tokens,
  *,
  beam_size: int,
  top_k: int | None = None,
  mask_mode: str = "after_softmax",
  voken_logits_only: bool = False,
  query_emb=None,
  query_head=None,
  trained_length: int | None = None,
  hybrid_weight: float | None = None,
  order_by_similarity: bool = True,
) -> SearchResult:
  """`run_search` with the settings spelled as keywords, for one-off calls (the Python API,
  tests, benchmarks): they make the `DecodeConfig` (which checks them) and nothing else.
  `top_k` defaults to `beam_size` (a larger one widens the beam, as `DecodeConfig.beam`);
  `order_by_similarity`: images of a leaf in similarity order when `query_emb` is given
  (tie-break "similarity"), else in id order ("image_id"; under avg_hybrid it then only
  re-scores the beam's B images)."""
  decode = DecodeConfig(
    beam_size=beam_size,
    top_k=beam_size if top_k is None else top_k,
    mask_mode=mask_mode,
    tie_break="similarity" if order_by_similarity else "image_id",
    voken_logits_only=bool(voken_logits_only),
    hybrid_weight=None if hybrid_weight is None else float(hybrid_weight),
    trained_length=trained_length,
  )
  return run_search(
    params, cfg, trie, vocab, input_tokens, decode, query_emb=query_emb, query_head=query_head
  )


def search_shardings(
  mesh, param_shardings, *, with_query_emb: bool = False
) -> tuple[tuple, SearchResult]:
  """`(in_shardings, out_shardings)` of `build_search`'s program on `mesh`: params as
  `param_shardings`, the trie replicated, queries (and their embeddings) and results sharded
  over the batch."""
  batch = partitioning.logical_sharding(mesh, "batch")
  batch2 = partitioning.logical_sharding(mesh, "batch", None)
  batch3 = partitioning.logical_sharding(mesh, "batch", None, None)
  ins = (param_shardings, partitioning.replicated(mesh), batch) + (
    (batch2,) if with_query_emb else ()
  )
  # The result's tree with a sharding per leaf (the NamedTuple's fields are typed as arrays).
  outs = SearchResult(item_ids=batch, scores=batch, codes=batch3, sequences=batch3)  # type: ignore[arg-type]
  return ins, outs


def make_search_fn(
  cfg: T5Config,
  vocab: VokenVocabulary,
  mesh,
  param_shardings,
  decode: DecodeConfig,
  *,
  query_head=None,
):
  """A `(params, device_trie, input_tokens [B, S], query_emb [B, D] | None) -> SearchResult`
  for `mesh`: `build_search` jitted with `search_shardings`.

  Params follow `param_shardings` (e.g. `t5.param_shardings(cfg, mesh)["params"]`), the trie
  is replicated, queries and results are sharded over the batch (B must divide over the
  `data` x `fsdp` devices). The trie should be placed with
  `trie.to_device(sharding=partitioning.replicated(mesh))`. With `query_head`
  (`models.query_head.QueryHead`), calls without `query_emb` predict it in the program.
  """
  settings = (cfg, vocab, decode.program)
  ins, outs = search_shardings(mesh, param_shardings)
  ins_emb, _ = search_shardings(mesh, param_shardings, with_query_emb=True)
  replicated = partitioning.replicated(mesh)
  # Jitted from the module-level program with static settings (not a closure), so searches
  # built again with equal settings, shardings and shapes reuse the compiled program.
  jit = lambda shardings: jax.jit(
    _search_program, static_argnums=(0, 1, 2), in_shardings=shardings, out_shardings=outs
  )
  jitted, jitted_emb = jit(ins), jit(ins_emb)
  if query_head is not None:
    query_head = jax.device_put(query_head, replicated)
    jitted_head = jit(ins + (replicated, replicated))  # query_emb None, then the head

  def search(params, trie, input_tokens, query_emb=None) -> SearchResult:
    if isinstance(trie, VokenTrie):
      trie = trie.to_device(sharding=replicated)
    with partitioning.activation_context(mesh):
      if query_emb is not None:
        return jitted_emb(*settings, params, trie, input_tokens, query_emb)
      if query_head is not None:
        return jitted_head(*settings, params, trie, input_tokens, None, query_head)
      return jitted(*settings, params, trie, input_tokens)

  return search


def results_to_numpy(result: SearchResult) -> dict[str, np.ndarray]:
  """Host copies of a SearchResult (for evaluation and serving)."""
  item_ids, scores, codes, sequences = jax.device_get(tuple(result))
  return {
    "item_ids": np.asarray(item_ids),
    "scores": np.asarray(scores),
    "codes": np.asarray(codes),
    "sequences": np.asarray(sequences),
  }
