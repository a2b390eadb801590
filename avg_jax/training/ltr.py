"""`avg-jax rank`: the discriminative (learning-to-rank) stage, from the generative checkpoint.

For each training query, a constrained beam search over the identifiers the generator is
trained on (the training images', plus the indexed images' under the transductive protocol;
with the current parameters, no gradient) proposes `rank.beam_size` candidates; the ground
truth is removed from them; all candidates and the positive are scored by teacher forcing (sum of
full-vocabulary log-softmax over the vokens and EOS); the loss is the generative
cross-entropy of the positive plus `rank.rank_weight` x the listwise softmax cross-entropy with
the positive first (the reference's double softmax behind `rank.double_softmax`). Candidate
search and loss run in one jitted, sharded step.
"""

import os

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict

from avg_jax import partitioning, paths
from avg_jax.data import pipeline
from avg_jax.decoding import search as search_lib
from avg_jax.evaluation import avg_eval
from avg_jax.metrics import MetricsWriter
from avg_jax.models import t5 as t5_lib
from avg_jax.training import generative, loop, losses, optim
from avg_jax.training.checkpointing import Checkpointer, StopSignal, save_params
from avg_jax.vokens import EOS_ID, PAD_ID


def candidate_targets(codes: jax.Array, offsets: jax.Array) -> jax.Array:
  """`codes int[B, beam, P]` -> decoder targets `int[B, beam, P + 1]` (vokens, EOS)."""
  tokens = codes + offsets[None, None, :]
  eos = jnp.full(codes.shape[:2] + (1,), EOS_ID, codes.dtype)
  return jnp.concatenate([tokens, eos], axis=-1)


def make_rank_loss_fn(cfg, vocab, *, beam_size: int, rank_weight: float, double_softmax: bool,
                      temperature: float, mask_mode: str, score_temperature: float = 1.0,
                      skip_twin_negatives: bool = False, voken_logits_only: bool = False,
                      trained_length: int | None = None):
  """`(params, batch, rng, trie) -> (loss, metrics)`; `batch` has `inputs [B, S]`, `targets
  [B, T + 1]` (T = `trained_length`, default the vocabulary's P); `trie` is the `DeviceTrie`
  of the training targets' identifiers.

  `skip_twin_negatives` drops candidates whose semantic codes (all levels before the
  disambiguation position) equal the positive's: they differ only in an arbitrary index that
  no query can predict. `score_temperature` divides the scores inside the listwise softmax.
  `voken_logits_only` applies to the candidate search only; the loss always scores with the
  full-vocabulary log-softmax, as the generative loss does.
  """
  levels = vocab.num_levels
  trained_length = vocab.id_length if trained_length is None else int(trained_length)
  offsets = jnp.asarray(vocab.position_offsets()[:trained_length], jnp.int32)

  def loss_fn(params, batch, rng, trie):
    inputs, targets = batch["inputs"], batch["targets"]
    b = inputs.shape[0]
    found = search_lib.constrained_search(
        jax.lax.stop_gradient(params), cfg, trie, vocab, inputs, beam_size=beam_size,
        top_k=beam_size, mask_mode=mask_mode, voken_logits_only=voken_logits_only,
        trained_length=trained_length)
    cand = candidate_targets(jnp.maximum(found.sequences, 0), offsets)      # [B, beam, T+1]
    is_positive = jnp.all(cand == targets[:, None, :], axis=-1)             # [B, beam]
    negative_ok = jnp.all(found.sequences >= 0, axis=-1) & ~is_positive
    if skip_twin_negatives and trained_length > levels:
      twin = jnp.all(cand[..., :levels] == targets[:, None, :levels], axis=-1)
      negative_ok = negative_ok & ~twin
    all_targets = jnp.concatenate([targets[:, None, :], cand], axis=1)      # [B, 1+beam, P+1]
    valid = jnp.concatenate([jnp.ones((b, 1), bool), negative_ok], axis=1)
    n = all_targets.shape[1]
    flat_inputs = jnp.repeat(inputs, n, axis=0)                             # [B*n, S]
    flat_targets = all_targets.reshape(b * n, -1)
    out = t5_lib.logits(params, cfg, flat_inputs, flat_targets, deterministic=False,
                        rngs={"dropout": rng})                              # [B*n, P+1, V]
    token_lp = jnp.sum(jax.nn.log_softmax(out, axis=-1) *
                       jax.nn.one_hot(flat_targets, out.shape[-1]), axis=-1)
    scores = jnp.sum(jnp.where(flat_targets != PAD_ID, token_lp, 0.0), axis=-1).reshape(b, n)
    positives = out.reshape(b, n, *out.shape[1:])[:, 0]
    gen_loss, accuracy, _ = losses.token_cross_entropy(positives, targets,
                                                       temperature=temperature)
    rank_loss = losses.listwise_softmax_loss(scores, valid, double_softmax=double_softmax,
                                             temperature=score_temperature)
    loss = gen_loss + rank_weight * rank_loss
    return loss, {"gen_loss": gen_loss, "rank_loss": rank_loss, "token_accuracy": accuracy,
                  "negatives": jnp.mean(jnp.sum(negative_ok, axis=-1).astype(jnp.float32)),
                  "positive_in_beam": jnp.mean(jnp.any(is_positive, axis=-1))}

  return loss_fn


def make_optimizer(config: ConfigDict):
  """`(tx, schedule)` of the rank stage: AdamW, warmup + linear decay, `train`'s clipping."""
  c = config.rank
  schedule = optim.warmup_linear_schedule(float(c.learning_rate), int(c.steps),
                                          int(c.warmup_fraction * c.steps))
  return optim.adamw(schedule, grad_clip_norm=float(config.train.grad_clip_norm)), schedule


def loss_fn_from_config(config: ConfigDict, cfg, vocab, trained_length: int | None = None):
  """`make_rank_loss_fn` with the `rank`, `train` and `decode` settings of `config`."""
  c = config.rank
  return make_rank_loss_fn(cfg, vocab, trained_length=trained_length,
                           beam_size=int(c.beam_size),
                           rank_weight=float(c.rank_weight),
                           double_softmax=bool(c.double_softmax),
                           temperature=float(config.train.temperature),
                           mask_mode=config.decode.mask_mode,
                           score_temperature=float(c.score_temperature),
                           skip_twin_negatives=bool(c.skip_twin_negatives),
                           voken_logits_only=bool(config.decode.voken_logits_only))


def compile_rank_step(loss_fn, tx, schedule, mesh, state_shardings, batch_example, trie):
  """`jax.jit` of `(state, batch, rng, trie) -> (state, metrics)` with explicit shardings
  (those of `batch_example` and `trie`, arrays or `ShapeDtypeStruct`s), donating the state."""

  def step_with_trie(state, batch, rng, trie_):
    return loop.make_train_step(lambda p, b, r: loss_fn(p, b, r, trie_), tx, schedule)(
        state, batch, rng)

  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  replicated = partitioning.replicated(mesh)
  return jax.jit(step_with_trie,
                 in_shardings=(state_shardings, shardings_of(batch_example), replicated,
                               shardings_of(trie)),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def run(config: ConfigDict, workdir: str) -> None:
  rank_generator(config, workdir, config.tokenizer.scheme)


def rank_generator(config: ConfigDict, workdir: str, scheme: str,
                   protocol: str | None = None) -> None:
  """Fine-tunes the finished generator of `scheme` under `protocol` (default
  `config.protocol`) with the listwise loss."""
  c = config.rank
  gen, mesh, params, param_shardings = generative.final_params(config, workdir, scheme, "train",
                                                               protocol)
  name = f"{scheme}, {gen.protocol}"
  directory = os.path.join(paths.rank_dir(workdir, scheme, gen.protocol), generative.CHECKPOINTS)
  final_dir = generative.params_dir(workdir, scheme, gen.protocol, "rank")
  if generative.already_finished(directory, final_dir, int(c.steps), gen, mesh):
    print(f"rank [{name}]: finished ({c.steps} steps) in {directory}; kept")
    return
  rng = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
  tx, schedule = make_optimizer(config)
  state, state_shardings = generative.create_state(params, tx, mesh)
  del params

  trie = gen.trie(gen.training_splits()).to_device(
      dense_levels=int(config.decode.dense_levels), sharding=partitioning.replicated(mesh))
  loss_fn = loss_fn_from_config(config, gen.cfg, gen.vocab, gen.trained_length)

  data_iter = pipeline.from_config(
      generative.training_source(config, workdir, gen),
      generative.per_process_batch(int(c.batch_size)), config.loader, shuffle=True,
      num_epochs=None, drop_remainder=True, global_order=True, seed=int(config.loader.shuffle_seed) + 1)
  checkpointer = Checkpointer(directory, keep=int(config.train.keep_checkpoints),
                              async_save=bool(config.train.async_checkpointing))
  writer = MetricsWriter(workdir, "rank", process_index=jax.process_index())
  try:
    state = generative.restore_or(checkpointer, state, data_iter, gen)
    if int(jax.device_get(state.step)) >= int(c.steps):
      generative.ensure_final_params(final_dir, state.params)
      print(f"rank [{name}]: already finished ({c.steps} steps) in {directory}")
      return
    batches = generative.device_batches(data_iter, mesh)
    first = next(batches)
    jitted = compile_rank_step(loss_fn, tx, schedule, mesh, state_shardings, first, trie)
    step_fn = lambda s, b, r: jitted(s, b, r, trie)

    search_fn = avg_eval.make_eval_search_fn(gen, mesh, state_shardings.params, config)

    def eval_fn(s):
      m = avg_eval.evaluate_recall(gen, s.params, state_shardings.params, mesh, config,
                                   workdir, "val", max_queries=int(config.train.eval_max_queries),
                                   search_fn=search_fn)
      return {"split": "val", "method": f"{scheme}_ltr", "protocol": gen.protocol,
              **{k: v for k, v in m.items() if not k.startswith("_")}}

    with partitioning.activation_context(mesh), StopSignal() as stop:
      state = loop.fit(step_fn=step_fn, state=state, rng=rng,
                       batches=generative._chain([first], batches), num_steps=int(c.steps),
                       checkpointer=checkpointer, checkpoint_every=int(c.checkpoint_every),
                       writer=writer, data_iter=data_iter,
                       metadata=generative.metadata(config, gen, "rank"),
                       log_every=int(config.train.log_every),
                       examples_per_step=int(c.batch_size), eval_fn=eval_fn,
                       eval_every=int(c.eval_every), stop=stop, desc=f"rank [{name}]")
    save_params(final_dir, state.params)
  finally:
    checkpointer.close()
