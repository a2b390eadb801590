"""A generator's train state on a mesh, its checkpoints and its final parameters.

A train (or rank) stage's folder, `paths.generator_dir(workdir, scheme, protocol, stage)`,
holds `checkpoints/` (train state + grain iterator, to resume) and, once finished, `params/`
(parameters only: what later stages load with `final_params`).
"""

import os
from collections.abc import Callable
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from avg_jax import loop, partitioning
from avg_jax.artifacts import fingerprint, paths, stage_inputs
from avg_jax.artifacts.checkpoints import Checkpointer, load_params, save_params
from avg_jax.errors import UserError
from avg_jax.models import t5 as t5_lib
from avg_jax.training import examples
from avg_jax.training import generator as generator_lib


def state_shardings(params, tx, mesh) -> loop.TrainState:
  """Shardings of `loop.create_state(params, tx)` for `params` (arrays or `ShapeDtypeStruct`s
  with shardings): each parameter-shaped optimizer leaf (Adam's moments, accumulated
  gradients) like its parameter, the rest (counts, step) replicated.

  Explicit because Adam's moments are zeros that do not depend on the parameters: left to XLA,
  they come out replicated, and under fsdp/model meshes 2/3 of the state would not shard.
  """
  replicated = partitioning.replicated(mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  shapes = jax.eval_shape(lambda p: loop.create_state(p, tx), params)
  opt_state = optax.tree_map_params(
    tx, lambda _, s: s, shapes.opt_state, param_shardings, transform_non_params=lambda _: replicated
  )
  # A TrainState of shardings (the state's tree structure, sharding leaves), not of arrays.
  return loop.TrainState(step=replicated, params=param_shardings, opt_state=opt_state)  # type: ignore[arg-type]


def abstract_state(params, tx, mesh) -> tuple[Any, loop.TrainState]:
  """`(state, shardings)` of the `TrainState` `create_state` makes, as `ShapeDtypeStruct`s."""
  shardings = state_shardings(params, tx, mesh)
  shapes = jax.eval_shape(lambda p: loop.create_state(p, tx), params)
  return partitioning.abstract(shapes, shardings), shardings


def create_state(params, tx, mesh) -> tuple[loop.TrainState, Any]:
  """A sharded `TrainState` and its shardings (see `state_shardings`); donates `params`."""
  shardings = state_shardings(params, tx, mesh)
  state = jax.jit(
    lambda p: loop.create_state(p, tx),
    in_shardings=(shardings.params,),
    out_shardings=shardings,
    donate_argnums=(0,),
  )(params)
  return state, shardings


def restore_or(checkpointer: Checkpointer, state, data_iter) -> loop.TrainState:
  """Resumes from the newest good checkpoint in the stage's own directory, if any (the
  stage's fingerprint guarantees they were made from the same inputs)."""
  found = checkpointer.restore_latest_good(partitioning.abstract(state), data_iter=data_iter)
  return state if found is None else found[1]


def params_dir(workdir: str, scheme: str, protocol: str, stage: str = "train") -> str:
  """Where a finished train (or rank) stage keeps its final parameters."""
  return paths.final_params_dir(paths.generator_dir(workdir, scheme, protocol, stage))


def stage_inputs_of(
  config: ConfigDict, workdir: str | None, scheme: str, protocol: str, stage: str
) -> dict:
  """What the train (or rank) stage of (`scheme`, `protocol`) is made from under `config`
  in `workdir` (avg_jax/artifacts/stage_inputs.py): its settings and those of every stage
  before it."""
  return generator_lib.made_from_inputs(config, workdir, scheme, protocol)(stage)


def stage_output(
  config: ConfigDict, gen: generator_lib.Generator, workdir: str, stage: str
) -> fingerprint.Output:
  """The folder of a train (or rank) stage: made from its stage inputs and the generator's
  voken table (and the targets it is trained on, `Generator.table_hash`). A finished one from
  other settings is trained again (a tuning change must never serve the old model)."""
  directory = paths.generator_dir(workdir, gen.scheme, gen.protocol, stage)
  made_from = dict(
    stage_inputs_of(config, workdir, gen.scheme, gen.protocol, stage), voken_table=gen.table_hash
  )
  return fingerprint.Output(
    directory,
    made_from,
    stage=f"{stage} [{gen.scheme}, {gen.protocol}]",
    on_other=stage_inputs.STAGES[stage].on_other,
  )


def is_current(
  config: ConfigDict, workdir: str, scheme: str, protocol: str, stage: str = "train"
) -> bool:
  """Whether the train (or rank) stage of (`scheme`, `protocol`) finished from `config`'s
  settings (its parameters are then checked when loaded)."""
  directory = paths.generator_dir(workdir, scheme, protocol, stage)
  return os.path.isdir(paths.final_params_dir(directory)) and not fingerprint.made_from(
    directory, stage_inputs_of(config, workdir, scheme, protocol, stage)
  )


def finished(out: fingerprint.Output, gen: generator_lib.Generator, mesh, steps: int) -> bool:
  """The stage reached `steps` from these inputs and its final parameters load."""
  final_dir = paths.final_params_dir(out.directory)
  return out.done(verify=lambda: params_load(final_dir, gen, mesh), steps=steps)


def params_load(directory: str, gen: generator_lib.Generator, mesh) -> str:
  """ "" when the final parameters in `directory` load, else why not."""
  try:
    load_params(directory, t5_lib.abstract_params(gen.cfg, mesh)[0])
  except UserError as e:
    return str(e)
  return ""


def ensure_final_params(directory: str, params) -> None:
  """(Re)writes a finished stage's parameters when they are missing or unreadable."""
  try:
    load_params(directory, partitioning.abstract(params))
  except UserError:
    save_params(directory, params)


def _flags(config: ConfigDict, gen: generator_lib.Generator) -> str:
  """The command-line flags that name `gen`'s (scheme, protocol) when `config`'s differ."""
  flags = [
    f"--config.{k}={v}"
    for k, v, mine in (
      ("tokenizer.scheme", gen.scheme, config.tokenizer.scheme),
      ("protocol", gen.protocol, config.protocol),
    )
    if v != mine
  ]
  return f" with {' '.join(flags)}" if flags else ""


def final_params(
  config: ConfigDict, workdir: str, scheme: str, stage: str = "train", protocol: str | None = None
):
  """`(gen, mesh, params, shardings)` of a finished train (or rank) stage."""
  gen = generator_lib.load_generator(config, workdir, scheme, protocol)
  mesh = partitioning.make_mesh(config.mesh)
  directory = params_dir(workdir, scheme, gen.protocol, stage)
  if not os.path.isdir(directory):
    raise UserError(
      f"no finished {stage} stage for scheme {scheme!r}, protocol "
      f"{gen.protocol!r} ({directory} is missing); run `avg-jax {stage}` first"
    )
  # Parameters trained with other settings (another learning rate, more steps) are not this
  # config's: a one-line error naming the changed keys, never the old model.
  fingerprint.require(
    os.path.dirname(directory),
    stage_inputs_of(config, workdir, scheme, gen.protocol, stage),
    stage=stage,
    remedy=stage_inputs.remedy(stage, _flags(config, gen)),
  )
  abstract, shardings = t5_lib.abstract_params(gen.cfg, mesh)
  try:
    params = load_params(directory, abstract)
  except UserError as e:  # rerunning the stage rewrites damaged final parameters
    raise UserError(f"{e}; rerun `avg-jax {stage}`") from e
  return gen, mesh, params, shardings


def train_to(
  directory: str,
  *,
  steps: int,
  state,
  step_fn_for: Callable,
  data_iter,
  mesh,
  rng,
  writer,
  metadata: dict,
  keep_checkpoints: int,
  async_checkpointing: bool,
  checkpoint_every: int,
  log_every: int,
  examples_per_step: int,
  eval_fn: Callable | None = None,
  eval_every: int = 0,
  desc: str = "train",
) -> bool:
  """Trains a generator stage in `directory` to `steps`, resuming from its checkpoints, and
  saves its final parameters. `step_fn_for(first device batch)` compiles the step. Returns
  False when a checkpoint had already reached `steps` (the parameters are then only
  rewritten if they do not load)."""
  final_dir = paths.final_params_dir(directory)
  checkpointer = Checkpointer(
    paths.checkpoints_dir(directory), keep=keep_checkpoints, async_save=async_checkpointing
  )
  try:
    state = restore_or(checkpointer, state, data_iter)
    if int(jax.device_get(state.step)) >= steps:
      ensure_final_params(final_dir, state.params)
      return False
    first, batches = examples.peek(examples.device_batches(data_iter, mesh))
    step_fn = step_fn_for(first)
    with partitioning.activation_context(mesh), loop.StopSignal() as stop:
      state = loop.fit(
        step_fn=step_fn,
        state=state,
        rng=rng,
        batches=batches,
        num_steps=steps,
        checkpointer=checkpointer,
        checkpoint_every=checkpoint_every,
        writer=writer,
        data_iter=data_iter,
        metadata=metadata,
        log_every=log_every,
        examples_per_step=examples_per_step,
        eval_fn=eval_fn,
        eval_every=eval_every,
        stop=stop,
        desc=desc,
      )
    save_params(final_dir, state.params)
    return True
  finally:
    checkpointer.close()
