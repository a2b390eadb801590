"""Model-agnostic, fixed-length, trie-constrained beam search inside `jax.jit`.

A search generates exactly P identifier tokens, then EOS: P + 1 model steps (P steps with
`emit_eos=False`, for a search over the first P positions of longer identifiers, where the
model would not emit EOS). Step 0 runs the
model on one row per query (all beams would start from the same start token); steps 1 .. P
run on `batch * beam` rows in one `fori_loop`. At every step each beam asks the constraint for
a fixed-width window of allowed codes (see `trie.DeviceTrie.children`), gathers their
log-probabilities from the model's output, and the best `beam_size` of the
`beam_size * width` candidates per query survive. The EOS step has one candidate per beam
(EOS) and only re-sorts.

Scores (`mask_mode`):
  "after_softmax" (default, the reference's semantics): log_softmax over the model's whole
      output row, then masking; a sequence's score is the sum of the full-vocabulary log-probs
      of its P tokens and EOS. Hugging Face reports this sum divided by P + 1
      (length_penalty 1); the ranking is the same.
  "renormalize": log-probs renormalised over the allowed children of each beam (t5x-style
      masking before the softmax); the EOS step then adds 0.

What the score is normalised over is whatever the callback's output row covers: pass full-
vocabulary logits for the reference semantics, or `logits_are_log_probs=True` when the
callback already returns log-probabilities (e.g. restricted rows normalised by a full-vocabulary
logsumexp).

Dead beams: a query may have fewer valid sequences than beams (beam > number of leaves, or
tokens of probability 0). Such beams carry `alive=False` and score -inf explicitly; they are
never chosen over a live candidate and come back as `leaf=-1`, `score=-inf`, `valid=False`,
codes -1. Ties are broken deterministically: by beam rank, then by code (`lax.top_k` keeps the
lower index first).
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from avg_jax.errors import UserError

MASK_MODES = ("after_softmax", "renormalize")
NEG_INF = -jnp.inf

# tokens [rows] int32, cache -> (logits [rows, V], cache); rows = B at step 0, B * beam after
TokensToLogits = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


@flax.struct.dataclass
class BeamState:
  """The search state: arrays are `[B, beams]` with one beam per query before step 0 and
  `beam_size` after; `cache` leaves are `[B * beams, ...]` (query-major)."""

  step: jax.Array  # [] int32: the position generated next (0 .. P; P is EOS)
  tokens: jax.Array  # [B, beam] int32: token fed to the model at this step
  codes: jax.Array  # [B, beam, P] int32: codes chosen so far
  node: Any  # [B, beam] int32: trie node at level `step` (a leaf after step P-1);
  # a pytree of such arrays for constraints with composite nodes
  scores: jax.Array  # [B, beam] float32: summed log-probs; -inf for dead beams
  alive: jax.Array  # [B, beam] bool
  cache: Any


@flax.struct.dataclass
class BeamResult:
  """Top-k results per query, best first."""

  codes: jax.Array  # [B, k, P] int32 (-1 where not valid)
  scores: jax.Array  # [B, k] float32 (-inf where not valid)
  leaf: Any  # [B, k] int32 leaf index in the trie (-1 where not valid); a pytree
  # of such arrays for composite nodes
  valid: jax.Array  # [B, k] bool


def _constrain(x: jax.Array, *names: str | None) -> jax.Array:
  # A no-op outside partitioning.activation_context; under a mesh it keeps `batch` sharded.
  return nn.with_logical_constraint(x, names + (None,) * (x.ndim - len(names)))


def root_node(constraint: Any, shape: tuple[int, ...]) -> Any:
  """The constraint's root node for every row: `zeros(shape)`, or its own composite form."""
  if hasattr(constraint, "root_node"):
    return constraint.root_node(shape)
  return jnp.zeros(shape, jnp.int32)


def expand_to_beams(tree: Any, beam_size: int) -> Any:
  """Repeats every leaf `[B, ...]` -> `[B * beam, ...]` (query-major, beams contiguous)."""
  return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def gather_beams(tree: Any, parent: jax.Array, batch_size: int, beam_size: int) -> Any:
  """Reorders leaves `[B * beam, ...]` so that new beam j of query b is old beam parent[b, j].

  Uses a batched `take_along_axis` over `[B, beam, ...]`, which keeps the batch axis local
  under SPMD (no gather across shards).
  """

  def gather(x):
    shaped = x.reshape((batch_size, beam_size) + x.shape[1:])
    index = parent.reshape(parent.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(shaped, index, axis=1).reshape(x.shape)

  return jax.tree.map(gather, tree)


def beam_search(
  tokens_to_logits: TokensToLogits,
  cache: Any,
  constraint: Any,
  *,
  batch_size: int,
  beam_size: int,
  top_k: int | None = None,
  token_offsets: Sequence[int],
  eos_id: int,
  logit_offsets: Sequence[int] | None = None,
  eos_logit_index: int | None = None,
  mask_mode: str = "after_softmax",
  logits_are_log_probs: bool = False,
  start_token: int = 0,
  reorder_cache: Callable[[Any, jax.Array], Any] | None = None,
  emit_eos: bool = True,
) -> BeamResult:
  """Constrained fixed-length beam search; call it inside `jax.jit`.

  Args:
    tokens_to_logits: `(tokens [rows] int32, cache) -> (logits [rows, V], cache)`, called
      with rows = B at step 0 and rows = B * beam (query-major) at steps 1 .. P.
    cache: the model's decoding state for `B` queries (every leaf `[B, ...]`); it is expanded
      to `B * beam` rows after step 0.
    constraint: a `trie.DeviceTrie` (or `trie.Unconstrained`) with `id_length` P.
    batch_size: B.
    beam_size: beams per query.
    top_k: results returned per query (default `beam_size`; at most `beam_size`).
    token_offsets: `[P]` token id of code 0 at each position (what is fed back to the model).
    eos_id: the EOS token id.
    logit_offsets / eos_logit_index: where those tokens sit in the callback's logits row
      (default: the token ids themselves, i.e. full-vocabulary logits).
    mask_mode: "after_softmax" | "renormalize" (module docstring).
    logits_are_log_probs: the callback returns log-probabilities; skip the log_softmax.
    start_token: the decoder's first input (T5: pad = 0).
    reorder_cache: `(cache, parent int32[B, beam]) -> cache`: make new beam j of query b
      carry old beam parent[b, j]'s state. Default: `gather_beams` on every leaf; a model
      can skip leaves that are equal across a query's beams (e.g. cross-attention K/V).
    emit_eos: score EOS after the P positions (False: the score covers the P positions only).

  Returns:
    `BeamResult` with `[B, k]` leaves (codes `[B, k, P]`), best first.
  """
  if mask_mode not in MASK_MODES:
    raise UserError(
      f"beam search: mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}"
    )
  top_k = beam_size if top_k is None else top_k
  if beam_size < 1:
    raise UserError(f"beam search: beam_size must be >= 1, got {beam_size}")
  if not 1 <= top_k <= beam_size:
    raise UserError(f"beam search: top_k must lie in [1, beam_size={beam_size}], got {top_k}")
  p = constraint.id_length
  if len(token_offsets) != p:
    raise UserError(
      f"beam search: {len(token_offsets)} token offsets for identifiers of length {p}"
    )
  logit_offsets = token_offsets if logit_offsets is None else logit_offsets
  eos_logit_index = eos_id if eos_logit_index is None else eos_logit_index
  b, beams = batch_size, beam_size

  # Position P emits EOS: code 0 at "offset" eos.
  token_base = jnp.asarray(list(token_offsets) + [eos_id], jnp.int32)  # [P + 1]
  logit_base = jnp.asarray(list(logit_offsets) + [eos_logit_index], jnp.int32)  # [P + 1]

  def advance(state: BeamState, step, children_fn, width: int, beams_in: int) -> BeamState:
    """One model step for `beams_in` beams per query -> `beams` beams per query.

    `children_fn(node [B*beams_in]) -> (codes, child, valid)`, each `[B*beams_in, width]`
    (`node` and `child`: pytrees of such arrays when the constraint's nodes are composite).
    """
    n = b * beams_in
    logits, cache = tokens_to_logits(state.tokens.reshape(n), state.cache)  # [n, V]
    logits = logits.astype(jnp.float32)
    codes_w, child_w, valid_w = children_fn(
      jax.tree.map(lambda x: x.reshape(n), state.node)
    )  # [n, W]
    lp = jnp.take_along_axis(logits, logit_base[step] + codes_w, axis=-1)  # [n, W]
    if not logits_are_log_probs:
      # log_softmax at the candidates only: the full [n, V] log-prob array is never built.
      lp = lp - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    valid_w = valid_w & state.alive.reshape(n, 1)
    if mask_mode == "renormalize":
      lse = jax.nn.logsumexp(jnp.where(valid_w, lp, NEG_INF), axis=-1, keepdims=True)
      lp = lp - jnp.where(valid_w.any(axis=-1, keepdims=True), lse, 0.0)
    cand = state.scores.reshape(n, 1) + lp  # [n, W]
    # A zero-probability token is as good as absent: it must never outrank a real result.
    cand_valid = valid_w & (cand > NEG_INF)
    flat = lambda x: x.reshape(b, beams_in * width)
    cand, cand_valid, codes_w = map(
      flat, (jnp.where(cand_valid, cand, NEG_INF), cand_valid, codes_w)
    )
    child_w = jax.tree.map(flat, child_w)
    short = beams - beams_in * width  # fewer candidate slots than beams: pad with invalid
    if short > 0:
      pad = lambda x, v: jnp.pad(x, ((0, 0), (0, short)), constant_values=v)
      cand, cand_valid = pad(cand, NEG_INF), pad(cand_valid, False)
      codes_w, child_w = pad(codes_w, 0), jax.tree.map(lambda x: pad(x, 0), child_w)
    top_scores, top_index = jax.lax.top_k(cand, beams)  # [B, beam]
    parent = jnp.minimum(top_index // width, beams_in - 1)  # [B, beam]
    take = lambda x: jnp.take_along_axis(x, top_index, axis=1)
    new_alive = take(cand_valid)  # [B, beam]
    new_code = take(codes_w)  # [B, beam]

    codes = jnp.take_along_axis(state.codes, parent[:, :, None], axis=1)  # [B, beam, P]
    at_step = jnp.arange(p)[None, None, :] == step  # [1, 1, P]
    codes = jnp.where(at_step, new_code[:, :, None], codes)
    if beams_in == 1:
      cache = expand_to_beams(cache, beams)  # every new beam descends from the only one
    elif reorder_cache is None:
      cache = gather_beams(cache, parent, b, beams)
    else:
      cache = reorder_cache(cache, parent)
    return BeamState(
      step=jnp.asarray(step, jnp.int32) + 1,
      tokens=_constrain(token_base[step] + new_code, "batch", "beam"),
      codes=_constrain(codes, "batch", "beam"),
      node=jax.tree.map(lambda x: _constrain(take(x), "batch", "beam"), child_w),
      scores=_constrain(jnp.where(new_alive, top_scores, NEG_INF), "batch", "beam"),
      alive=_constrain(new_alive, "batch", "beam"),
      cache=cache,
    )

  # Step 0 runs on one beam per query: every beam would start from the same start token, so
  # the model runs on B rows instead of B * beam and the cache is expanded afterwards. (HF
  # runs all beams and gives beams 1.. a -1e9 score, which can leak finite duplicates into
  # the results when candidates run short; here missing beams are explicitly dead.)
  state = BeamState(
    step=jnp.zeros((), jnp.int32),
    tokens=jnp.full((b, 1), start_token, jnp.int32),
    codes=jnp.zeros((b, 1, p), jnp.int32),
    node=root_node(constraint, (b, 1)),
    scores=jnp.zeros((b, 1), jnp.float32),
    alive=jnp.ones((b, 1), bool),
    cache=cache,
  )
  root_width = constraint.widths[0]
  state = advance(state, 0, lambda n: constraint.children(0, n, root_width), root_width, 1)

  # Steps 1 .. P (P: EOS) in one loop; each level's window is padded to the widest of them.
  width = max(tuple(constraint.widths[1:]) + (1,))

  def eos_children(n):
    slot = jnp.arange(width, dtype=jnp.int32)[None, :]
    rows = jax.tree.leaves(n)[0].shape[0]
    shape = (rows, width)
    return (
      jnp.zeros(shape, jnp.int32),
      jax.tree.map(lambda x: jnp.broadcast_to(x[:, None], shape), n),
      jnp.broadcast_to(slot == 0, shape),
    )

  def level_children(level):
    return lambda n: constraint.children(level, n, width)

  branches = [level_children(level) for level in range(1, p)]
  branches += [eos_children] if emit_eos else []

  def body(step, state: BeamState) -> BeamState:
    children_fn = lambda n: jax.lax.switch(step - 1, branches, n)
    return advance(state, step, children_fn, width, beams)

  if branches:
    state = jax.lax.fori_loop(1, len(branches) + 1, body, state)
  alive = state.alive[:, :top_k]
  return BeamResult(
    codes=jnp.where(alive[:, :, None], state.codes[:, :top_k], -1),
    scores=jnp.where(alive, state.scores[:, :top_k], NEG_INF),
    leaf=jax.tree.map(lambda x: jnp.where(alive, x[:, :top_k], -1), state.node),
    valid=alive,
  )
