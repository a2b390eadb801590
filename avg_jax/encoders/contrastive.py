"""Contrastive (CLIP) training: symmetric InfoNCE with a learned temperature, AdamW with
warmup + cosine decay, and a jitted, sharded train step with donated state."""

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from avg_jax import loop, partitioning
from avg_jax.encoders import clip, preprocess

# CLIP clamps the learned logit scale at 100 so the temperature cannot collapse.
MAX_LOGIT_SCALE = math.log(100.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows scaled to unit L2 norm: `[..., dim]` -> `[..., dim]` (zero rows stay zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def clip_logits(
  image_features: jax.Array, text_features: jax.Array, logit_scale: jax.Array
) -> jax.Array:
  """`[B, D]`, `[B, D]`, scalar log-scale -> `[B, B]` scaled cosine similarities
  (rows: images, columns: texts)."""
  scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), MAX_LOGIT_SCALE))
  return scale * l2_normalize(image_features) @ l2_normalize(text_features).T


def symmetric_infonce(logits: jax.Array, same_item: jax.Array | None = None) -> jax.Array:
  """Mean of image->text and text->image cross-entropies with the diagonal as targets.

  logits: `[B, B]` (row i: image i against every text). same_item: optional `bool[B, B]`,
  true where row and column come from the same image; those off-diagonal entries are not
  negatives (two captions of one image in a batch) and are removed from both softmaxes.
  """
  logits = logits.astype(jnp.float32)
  if same_item is not None:
    off_diagonal = same_item & ~jnp.eye(logits.shape[0], dtype=bool)
    logits = jnp.where(off_diagonal, -jnp.inf, logits)
  diagonal = jnp.diagonal(logits)
  image_to_text = jax.nn.logsumexp(logits, axis=1) - diagonal
  text_to_image = jax.nn.logsumexp(logits, axis=0) - diagonal
  return 0.5 * (image_to_text.mean() + text_to_image.mean())


def learning_rate_schedule(train_cfg: Mapping[str, Any]) -> optax.Schedule:
  """Linear warmup to `learning_rate`, then cosine decay to 0 at `steps`."""
  steps = int(train_cfg["steps"])
  warmup = min(int(train_cfg["warmup_steps"]), max(steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=float(train_cfg["learning_rate"]),
    warmup_steps=warmup,
    decay_steps=max(steps, warmup + 1),
    end_value=0.0,
  )


def make_optimizer(train_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  """AdamW; weight decay only on matrices (not biases, LayerNorm, the logit scale)."""
  decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
  return optax.adamw(
    learning_rate_schedule(train_cfg),
    b1=0.9,
    b2=0.98,
    eps=1e-6,
    weight_decay=float(train_cfg["weight_decay"]),
    mask=decay_mask,
  )


def create_train_state(
  cfg: clip.ClipConfig, tx: optax.GradientTransformation, mesh: Mesh, rng: jax.Array
) -> tuple[loop.TrainState, Any]:
  """A freshly initialised `TrainState`, created already sharded, and its shardings tree."""
  init_variables = clip.init_fn(cfg)

  def make(rng):
    # Boxed params: the optimizer state inherits their logical annotations.
    return loop.create_state(init_variables(rng)["params"], tx)

  return partitioning.sharded_init(make, mesh, rng)


def loss_and_metrics(
  params: Any,
  cfg: clip.ClipConfig,
  batch: Mapping[str, jax.Array],
  mean=preprocess.CLIP_MEAN,
  std=preprocess.CLIP_STD,
):
  """batch: `image uint8[B, H, W, 3]`, `tokens int[B, L]`, `image_id int[B]`."""
  images = preprocess.normalize(batch["image"], mean, std)
  # flax types apply's result as output | (output, state); without mutable= it is the output.
  image_features, text_features, logit_scale = clip.Clip(cfg).apply(  # type: ignore[misc]
    {"params": params}, images, batch["tokens"]
  )
  logits = clip_logits(image_features, text_features, logit_scale)
  same = batch["image_id"][:, None] == batch["image_id"][None, :]
  loss = symmetric_infonce(logits, same)
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
  temperature = jnp.exp(-jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  return loss, {"loss": loss, "accuracy": accuracy, "temperature": temperature}


def make_train_step(
  cfg: clip.ClipConfig,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  mesh: Mesh,
  state_shardings: Any,
  mean=preprocess.CLIP_MEAN,
  std=preprocess.CLIP_STD,
) -> Callable[[loop.TrainState, dict, jax.Array], tuple[loop.TrainState, dict]]:
  """`step(state, batch, rng) -> (state, metrics)` (the shared loop's step shape), jitted with
  explicit shardings; the state is donated. Batch leaves are split along `batch`."""
  loss_fn = lambda params, batch, rng: loss_and_metrics(params, cfg, batch, mean, std)
  step = loop.make_train_step(loss_fn, tx, schedule)
  replicated = partitioning.replicated(mesh)
  jitted = jax.jit(
    step,
    in_shardings=(state_shardings, batch_shardings(mesh), replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )

  def run(state, batch, rng):
    # Logical constraints inside the model resolve against this mesh at trace time.
    with partitioning.activation_context(mesh):
      return jitted(state, batch, rng)

  return run


def batch_shardings(mesh: Mesh) -> dict:
  """Shardings of a training batch: every leaf split along its leading `batch` axis."""
  return {
    "image": partitioning.logical_sharding(mesh, "batch", None, None, None),
    "tokens": partitioning.logical_sharding(mesh, "batch", "length"),
    "image_id": partitioning.logical_sharding(mesh, "batch"),
  }
