"""`avg-jax rank`: the discriminative (learning-to-rank) stage, from the generative checkpoint.

Fine-tunes the finished generator of `config.tokenizer.scheme` under `config.protocol` with
the listwise loss (avg_jax/training/ltr.py; its settings, and the six it shares with the train
stage: `ltr.RankOptions`) to `rank.steps` in `paths.rank_dir(workdir, scheme, protocol)`,
resuming from its checkpoints, with validation Recall@K every `rank.eval_every` steps.
"""

import jax
from ml_collections import ConfigDict

from avg_jax import partitioning
from avg_jax.artifacts import locks, paths
from avg_jax.evaluation import avg_eval
from avg_jax.metrics import MetricsWriter
from avg_jax.training import examples, generative, ltr
from avg_jax.training import state as state_lib


def run(config: ConfigDict, workdir: str) -> None:
  rank_generator(config, workdir, config.tokenizer.scheme)


@locks.holding("rank")
def rank_generator(
  config: ConfigDict, workdir: str, scheme: str, protocol: str | None = None
) -> None:
  """Fine-tunes the finished generator of `scheme` under `protocol` (default
  `config.protocol`) with the listwise loss."""
  options = ltr.RankOptions.from_config(config)
  gen, mesh, params, param_shardings = state_lib.final_params(
    config, workdir, scheme, "train", protocol
  )
  name = f"{scheme}, {gen.protocol}"
  out = state_lib.stage_output(config, gen, workdir, "rank")
  checkpoints = paths.checkpoints_dir(out.directory)
  if state_lib.finished(out, gen, mesh, options.steps):
    print(f"rank [{name}]: finished ({options.steps} steps) in {checkpoints}; kept")
    return
  out.begin()
  rng = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
  tx, _ = ltr.make_optimizer(options)
  state, state_shardings = state_lib.create_state(params, tx, mesh)
  del params

  trie = gen.trie(gen.training_splits()).to_device(
    dense_levels=options.decode.dense_levels, sharding=partitioning.replicated(mesh)
  )
  settings = ltr.RankStep.of(options, gen.cfg, gen.vocab, gen.trained_length)
  data_iter = examples.loader(config, workdir, gen, options.batch_size, seed_offset=1)

  def step_fn_for(first):
    jitted = ltr.compile_rank_step(mesh, state_shardings, first, trie)
    return lambda s, b, r: jitted(settings, s, b, r, trie)

  trained = state_lib.train_to(
    out.directory,
    steps=options.steps,
    state=state,
    step_fn_for=step_fn_for,
    data_iter=data_iter,
    mesh=mesh,
    rng=rng,
    writer=MetricsWriter(
      workdir,
      "rank",
      process_index=jax.process_index(),
      run={"scheme": scheme, "protocol": gen.protocol},
    ),
    metadata=generative.metadata(config, gen, "rank"),
    keep_checkpoints=options.keep_checkpoints,
    async_checkpointing=options.async_checkpointing,
    checkpoint_every=options.checkpoint_every,
    log_every=options.log_every,
    examples_per_step=options.batch_size,
    eval_fn=avg_eval.eval_fn_for(
      config, workdir, gen, mesh, state_shardings.params, f"{scheme}_ltr", options.eval_max_queries
    ),
    eval_every=options.eval_every,
    desc=f"rank [{name}]",
  )
  if not trained:
    print(f"rank [{name}]: already finished ({options.steps} steps) in {checkpoints}")
  out.finish(steps=options.steps)
