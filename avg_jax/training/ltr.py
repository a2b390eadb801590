"""The discriminative (learning-to-rank) objective, fine-tuning a finished generator.

For each training query, a constrained beam search over the identifiers the generator is
trained on (the training images', plus the indexed images' under the transductive protocol;
with the current parameters, no gradient) proposes `rank.beam_size` candidates; the ground
truth is removed from them; all candidates and the positive are scored by teacher forcing (sum of
full-vocabulary log-softmax over the vokens and EOS; one encoder pass per query, the 1 + beam
targets packed as segments of one decoder sequence: `t5.candidate_logits`); the loss is the
generative cross-entropy of the positive plus `rank.rank_weight` x the listwise softmax
cross-entropy with the positive first (the reference's double softmax behind
`rank.double_softmax`). Candidate search and loss run in one jitted, sharded step
(`compile_rank_step`). The stage that runs it: avg_jax/stages/rank.py.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from avg_jax import loop, partitioning
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.config import DecodeConfig
from avg_jax.models import t5 as t5_lib
from avg_jax.training import losses, optim
from avg_jax.vokens import EOS_ID


@dataclasses.dataclass(frozen=True)
class RankOptions:
  """The rank stage's settings: its own `rank.*` section, plus six read from `train.*` on
  purpose, because learning to rank continues the same generator's training:

  `temperature` (train.temperature): the generative term of the rank loss is the generative
  stage's cross-entropy, so it keeps its temperature. `grad_clip_norm` (train.grad_clip_norm):
  the same clipping of the same model's gradients. `keep_checkpoints`, `async_checkpointing`,
  `log_every` (train.*): how the generator's checkpoints and logs are kept, one policy for both
  stages. `eval_max_queries` (train.eval_max_queries): the validation queries, the same for
  both stages so that their validation Recall@K compare. `decode`: the candidate search, with
  `config.decode`'s scoring and `rank.beam_size` beams and candidates.
  """

  steps: int
  batch_size: int
  learning_rate: float
  warmup_fraction: float
  rank_weight: float
  double_softmax: bool
  score_temperature: float
  skip_twin_negatives: bool
  checkpoint_every: int
  eval_every: int
  temperature: float
  grad_clip_norm: float
  keep_checkpoints: int
  async_checkpointing: bool
  log_every: int
  eval_max_queries: int
  decode: DecodeConfig

  @classmethod
  def from_config(cls, config: ConfigDict) -> "RankOptions":
    c, t = config.rank, config.train
    beam = int(c.beam_size)
    return cls(
      steps=int(c.steps),
      batch_size=int(c.batch_size),
      learning_rate=float(c.learning_rate),
      warmup_fraction=float(c.warmup_fraction),
      rank_weight=float(c.rank_weight),
      double_softmax=bool(c.double_softmax),
      score_temperature=float(c.score_temperature),
      skip_twin_negatives=bool(c.skip_twin_negatives),
      checkpoint_every=int(c.checkpoint_every),
      eval_every=int(c.eval_every),
      temperature=float(t.temperature),
      grad_clip_norm=float(t.grad_clip_norm),
      keep_checkpoints=int(t.keep_checkpoints),
      async_checkpointing=bool(t.async_checkpointing),
      log_every=int(t.log_every),
      eval_max_queries=int(t.eval_max_queries),
      decode=dataclasses.replace(
        DecodeConfig.from_config(config.decode),
        beam_size=beam,
        top_k=beam,
        # Candidates are the generator's own beam.
        hybrid_weight=None,
      ),
    )


def candidate_targets(codes: jax.Array, offsets: jax.Array) -> jax.Array:
  """`codes int[B, beam, P]` -> decoder targets `int[B, beam, P + 1]` (vokens, EOS)."""
  tokens = codes + offsets[None, None, :]
  eos = jnp.full(codes.shape[:2] + (1,), EOS_ID, codes.dtype)
  return jnp.concatenate([tokens, eos], axis=-1)


def make_rank_loss_fn(
  cfg,
  vocab,
  *,
  decode: DecodeConfig,
  rank_weight: float,
  double_softmax: bool,
  temperature: float,
  score_temperature: float = 1.0,
  skip_twin_negatives: bool = False,
  trained_length: int | None = None,
):
  """`(params, batch, rng, trie) -> (loss, metrics)`; `batch` has `inputs [B, S]`, `targets
  [B, T + 1]` (T = `trained_length`, default the vocabulary's P); `trie` is the `DeviceTrie`
  of the training targets' identifiers.

  `skip_twin_negatives` drops candidates whose semantic codes (all levels before the
  disambiguation position) equal the positive's: they differ only in an arbitrary index that
  no query can predict. `score_temperature` divides the scores inside the listwise softmax.
  `decode` is the candidate search (`decode.top_k` candidates); its `voken_logits_only`
  applies to that search only: the loss always scores with the full-vocabulary log-softmax,
  as the generative loss does.
  """
  levels = vocab.num_levels
  trained_length = vocab.id_length if trained_length is None else int(trained_length)
  offsets = jnp.asarray(vocab.position_offsets()[:trained_length], jnp.int32)
  search = decode.for_generator(trained_length)

  def loss_fn(params, batch, rng, trie):
    inputs, targets = batch["inputs"], batch["targets"]
    b = inputs.shape[0]
    found = search_lib.run_search(jax.lax.stop_gradient(params), cfg, trie, vocab, inputs, search)
    cand = candidate_targets(jnp.maximum(found.sequences, 0), offsets)  # [B, beam, T+1]
    is_positive = jnp.all(cand == targets[:, None, :], axis=-1)  # [B, beam]
    negative_ok = jnp.all(found.sequences >= 0, axis=-1) & ~is_positive
    if skip_twin_negatives and trained_length > levels:
      twin = jnp.all(cand[..., :levels] == targets[:, None, :levels], axis=-1)
      negative_ok = negative_ok & ~twin
    all_targets = jnp.concatenate([targets[:, None, :], cand], axis=1)  # [B, 1+beam, P+1]
    valid = jnp.concatenate([jnp.ones((b, 1), bool), negative_ok], axis=1)
    # One encoder pass per query, the 1 + beam targets packed into one decoder sequence:
    # repeating the query per candidate cost 1 + beam times the encoder's work and memory.
    out = t5_lib.candidate_logits(
      params, cfg, inputs, all_targets, deterministic=False, rngs={"dropout": rng}
    )  # [B, n, P+1, V]
    scores = t5_lib.sequence_log_probs(out, all_targets)  # [B, n]
    positives = out[:, 0]
    gen_loss, accuracy, _ = losses.token_cross_entropy(positives, targets, temperature=temperature)
    rank_loss = losses.listwise_softmax_loss(
      scores, valid, double_softmax=double_softmax, temperature=score_temperature
    )
    loss = gen_loss + rank_weight * rank_loss
    return loss, {
      "gen_loss": gen_loss,
      "rank_loss": rank_loss,
      "token_accuracy": accuracy,
      "negatives": jnp.mean(jnp.sum(negative_ok, axis=-1).astype(jnp.float32)),
      "positive_in_beam": jnp.mean(jnp.any(is_positive, axis=-1)),
    }

  return loss_fn


def make_optimizer(options: RankOptions):
  """`(tx, schedule)` of the rank stage: AdamW, warmup + linear decay, the generator's clipping."""
  return optim.AdamWSchedule(
    options.learning_rate,
    options.steps,
    int(options.warmup_fraction * options.steps),
    grad_clip_norm=options.grad_clip_norm,
  ).build()


def loss_fn_from_config(options: RankOptions, cfg, vocab, trained_length: int | None = None):
  """`make_rank_loss_fn` with the settings of `options`."""
  return make_rank_loss_fn(
    cfg,
    vocab,
    trained_length=trained_length,
    decode=options.decode,
    rank_weight=options.rank_weight,
    double_softmax=options.double_softmax,
    temperature=options.temperature,
    score_temperature=options.score_temperature,
    skip_twin_negatives=options.skip_twin_negatives,
  )


class RankStep(NamedTuple):
  """Everything static about the rank step (hashable: the jit static argument that lets
  every rank stage of equal settings and shapes in a process share one compiled program)."""

  options: RankOptions
  cfg: Any
  vocab: Any
  trained_length: int | None = None

  @classmethod
  def of(cls, options: RankOptions, cfg, vocab, trained_length: int | None = None) -> "RankStep":
    """The step's settings, keeping of `options` only what the program depends on: the
    loop's cadences and the batch size (a shape, not a setting) would make equal programs
    miss jit's cache (a variant that only logs differently would compile again)."""
    program = dataclasses.replace(
      options,
      batch_size=0,
      checkpoint_every=0,
      eval_every=0,
      keep_checkpoints=0,
      async_checkpointing=False,
      log_every=0,
      eval_max_queries=0,
    )
    return cls(program, cfg, vocab, trained_length)


def _rank_step(settings: RankStep, state, batch, rng, trie):
  tx, schedule = make_optimizer(settings.options)
  loss_fn = loss_fn_from_config(
    settings.options, settings.cfg, settings.vocab, settings.trained_length
  )
  return loop.make_train_step(lambda p, b, r: loss_fn(p, b, r, trie), tx, schedule)(
    state, batch, rng
  )


def compile_rank_step(mesh, state_shardings, batch_example, trie):
  """`jax.jit` of `(settings: RankStep, state, batch, rng, trie) -> (state, metrics)` with
  explicit shardings (those of `batch_example` and `trie`, arrays or `ShapeDtypeStruct`s),
  donating the state. The optimizer is `make_optimizer(settings.options)`, built inside the
  program: the state must come from the same settings."""
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  replicated = partitioning.replicated(mesh)
  # A module-level function with static settings: a rerun (evaluate's generators of the other
  # protocol, a variant) finds the compiled program in jit's cache instead of compiling again.
  return jax.jit(
    _rank_step,
    static_argnums=0,
    in_shardings=(state_shardings, shardings_of(batch_example), replicated, shardings_of(trie)),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(1,),
  )
