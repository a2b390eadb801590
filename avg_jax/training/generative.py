"""The generative objective: teacher-forced cross-entropy of the identifier tokens and EOS.

The step is `loop.make_train_step` over `make_loss_fn`, jitted with explicit shardings and the
state donated (`compile_train_step`; `compile_step` jits any other step function); AdamW with
linear warmup + decay, clipping, optional accumulation (`make_optimizer`). The stage that runs
it: avg_jax/stages/train.py.
"""

from typing import NamedTuple

import jax
from ml_collections import ConfigDict

from avg_jax import config as config_lib
from avg_jax import loop, partitioning
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.training import losses, optim


def make_loss_fn(cfg, temperature: float):
  """`(params, batch, rng) -> (loss, metrics)` for teacher-forced generation."""

  def loss_fn(params, batch, rng):
    out = t5_lib.logits(
      params, cfg, batch["inputs"], batch["targets"], deterministic=False, rngs={"dropout": rng}
    )
    loss, accuracy, num_tokens = losses.token_cross_entropy(
      out, batch["targets"], temperature=temperature
    )
    return loss, {"token_accuracy": accuracy, "num_tokens": num_tokens}

  return loss_fn


def _step_shardings(mesh, state_shardings, batch_example) -> dict:
  """jit's shardings of a `(state, batch, rng) -> (state, metrics)` step."""
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch_example)
  replicated = partitioning.replicated(mesh)
  return dict(
    in_shardings=(state_shardings, batch_shardings, replicated),
    out_shardings=(state_shardings, replicated),
  )


def compile_step(step_fn, mesh, state_shardings, batch_example):
  """`jax.jit` with explicit shardings, donating the state."""
  return jax.jit(
    step_fn, donate_argnums=(0,), **_step_shardings(mesh, state_shardings, batch_example)
  )


def optimizer_settings(config: ConfigDict) -> optim.AdamWSchedule:
  """The generative stage's optimizer (AdamW, warmup + linear decay, clipping, accumulation)
  as `train.*` configures it."""
  c = config.train
  return optim.AdamWSchedule(
    learning_rate=float(c.learning_rate),
    steps=int(c.steps),
    warmup_steps=int(c.warmup_fraction * c.steps),
    end_fraction=float(c.end_learning_rate_fraction),
    weight_decay=float(c.weight_decay),
    grad_clip_norm=float(c.grad_clip_norm),
    accumulation_steps=int(c.grad_accum_steps),
  )


def make_optimizer(config: ConfigDict):
  """`(tx, schedule)` of the generative stage (`optimizer_settings`)."""
  return optimizer_settings(config).build()


class TrainStep(NamedTuple):
  """Everything static about the generative step (hashable: the jit static argument that lets
  every train stage of equal settings and shapes in a process share one compiled program)."""

  cfg: T5Config
  temperature: float
  optimizer: optim.AdamWSchedule


def step_settings(config: ConfigDict, cfg: T5Config) -> TrainStep:
  return TrainStep(cfg, float(config.train.temperature), optimizer_settings(config))


def _train_step(settings: TrainStep, state, batch, rng):
  tx, schedule = settings.optimizer.build()
  step = loop.make_train_step(make_loss_fn(settings.cfg, settings.temperature), tx, schedule)
  return step(state, batch, rng)


def compile_train_step(mesh, state_shardings, batch_example):
  """`jax.jit` of the stage's step `(settings: TrainStep, state, batch, rng) -> (state,
  metrics)` with explicit shardings, donating the state. The optimizer is built inside from
  `settings.optimizer`: the state must come from the same settings (`make_optimizer`)."""
  # A module-level function with static settings: a rerun (evaluate's generator of the other
  # protocol, a variant) finds the compiled program in jit's cache instead of compiling again.
  return jax.jit(
    _train_step,
    static_argnums=0,
    donate_argnums=(1,),
    **_step_shardings(mesh, state_shardings, batch_example),
  )


def metadata(config: ConfigDict, gen, stage: str) -> dict:
  return {
    "stage": stage,
    "scheme": gen.scheme,
    "protocol": gen.protocol,
    "voken_table_hash": gen.table_hash,
    "config": config_lib.to_json_dict(config),
  }
