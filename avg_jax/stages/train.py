"""`avg-jax train`: the generative stage (caption or pseudo query -> voken ids + EOS).

Trains the generator of `config.tokenizer.scheme` under `config.protocol` (its examples:
avg_jax/training/examples.py; its loss and optimizer: avg_jax/training/generative.py) to
`train.steps` in `paths.train_dir(workdir, scheme, protocol)`, resuming from its checkpoints,
with validation Recall@K through the constrained search every `train.eval_every` steps. The
folder is made from the settings of this stage and every stage before it
(avg_jax/artifacts/stage_inputs.py) and the voken table: a finished one is kept; one made
with other settings (a learning rate, the steps: the schedule spans them) is trained again
from the start, and the rank stage built on it follows.
"""

import functools

import jax
from ml_collections import ConfigDict

from avg_jax import partitioning
from avg_jax.artifacts import locks, paths
from avg_jax.evaluation import avg_eval
from avg_jax.metrics import MetricsWriter
from avg_jax.training import examples, generative
from avg_jax.training import generator as generator_lib
from avg_jax.training import state as state_lib


def run(config: ConfigDict, workdir: str) -> None:
  train_generator(config, workdir, config.tokenizer.scheme)


@locks.holding("train")
def train_generator(
  config: ConfigDict, workdir: str, scheme: str, protocol: str | None = None
) -> None:
  """Trains the generator of `scheme` under `protocol` (default `config.protocol`) to
  `train.steps` (resuming when possible)."""
  c = config.train
  gen = generator_lib.load_generator(config, workdir, scheme, protocol)
  name = f"{scheme}, {gen.protocol}"
  mesh = partitioning.make_mesh(config.mesh)
  out = state_lib.stage_output(config, gen, workdir, "train")
  checkpoints = paths.checkpoints_dir(out.directory)
  if state_lib.finished(out, gen, mesh, int(c.steps)):
    print(f"train [{name}]: finished ({c.steps} steps) in {checkpoints}; kept")
    return
  out.begin()
  rng = jax.random.key(int(config.seed))
  init_rng, dropout_rng = jax.random.split(rng)
  params, _ = generator_lib.init_params(config, gen, mesh, init_rng)
  tx, _ = generative.make_optimizer(config)
  state, state_shardings = state_lib.create_state(params, tx, mesh)
  del params

  data_iter = examples.loader(config, workdir, gen, int(c.batch_size))
  settings = generative.step_settings(config, gen.cfg)
  trained = state_lib.train_to(
    out.directory,
    steps=int(c.steps),
    state=state,
    step_fn_for=lambda first: functools.partial(
      generative.compile_train_step(mesh, state_shardings, first), settings
    ),
    data_iter=data_iter,
    mesh=mesh,
    rng=dropout_rng,
    writer=MetricsWriter(
      workdir,
      "train",
      process_index=jax.process_index(),
      run={"scheme": scheme, "protocol": gen.protocol},
    ),
    metadata=generative.metadata(config, gen, "train"),
    keep_checkpoints=int(c.keep_checkpoints),
    async_checkpointing=bool(c.async_checkpointing),
    checkpoint_every=int(c.checkpoint_every),
    log_every=int(c.log_every),
    examples_per_step=int(c.batch_size),
    eval_fn=avg_eval.eval_fn_for(
      config, workdir, gen, mesh, state_shardings.params, scheme, int(c.eval_max_queries)
    ),
    eval_every=int(c.eval_every),
    desc=f"train [{name}]",
  )
  if not trained:
    print(f"train [{name}]: already finished ({c.steps} steps) in {checkpoints}")
  out.finish(steps=int(c.steps))
