"""The generative objective: teacher-forced cross-entropy of the identifier tokens and EOS.

The step is `loop.make_train_step` over `make_loss_fn`, jitted with explicit shardings and the
state donated (`compile_step`); AdamW with linear warmup + decay, clipping, optional
accumulation (`make_optimizer`). The stage that runs it: avg_jax/stages/train.py.
"""

import jax
from ml_collections import ConfigDict

from avg_jax import config as config_lib
from avg_jax import loop, partitioning
from avg_jax.models import t5 as t5_lib
from avg_jax.training import losses, optim


def make_loss_fn(cfg, temperature: float):
  """`(params, batch, rng) -> (loss, metrics)` for teacher-forced generation."""

  def loss_fn(params, batch, rng):
    out = t5_lib.logits(params, cfg, batch["inputs"], batch["targets"], deterministic=False,
                        rngs={"dropout": rng})
    loss, accuracy, num_tokens = losses.token_cross_entropy(out, batch["targets"],
                                                            temperature=temperature)
    return loss, {"token_accuracy": accuracy, "num_tokens": num_tokens}

  return loss_fn


def compile_step(step_fn, mesh, state_shardings, batch_example):
  """`jax.jit` with explicit shardings, donating the state."""
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch_example)
  replicated = partitioning.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_optimizer(config: ConfigDict):
  """`(tx, schedule)` of the generative stage (AdamW, warmup + linear decay, clipping,
  accumulation), as `train.*` configures it."""
  c = config.train
  schedule = optim.warmup_linear_schedule(float(c.learning_rate), int(c.steps),
                                          int(c.warmup_fraction * c.steps),
                                          float(c.end_learning_rate_fraction))
  tx = optim.adamw(schedule, weight_decay=float(c.weight_decay),
                   grad_clip_norm=float(c.grad_clip_norm),
                   accumulation_steps=int(c.grad_accum_steps))
  return tx, schedule


def metadata(config: ConfigDict, gen, stage: str) -> dict:
  return {"stage": stage, "scheme": gen.scheme, "protocol": gen.protocol,
          "voken_table_hash": gen.table_hash, "config": config_lib.to_json_dict(config)}


def make_step(config: ConfigDict, cfg, tx, schedule):
  """The train step `(state, batch, rng) -> (state, metrics)` the train stage compiles."""
  return loop.make_train_step(make_loss_fn(cfg, float(config.train.temperature)), tx, schedule)
