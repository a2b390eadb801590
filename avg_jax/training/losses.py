"""Losses of the two training stages, as pure functions of logits / scores."""

import jax
import jax.numpy as jnp

from avg_jax.vokens import PAD_ID


def token_cross_entropy(
  logits: jax.Array, targets: jax.Array, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean cross-entropy of `logits [batch, length, vocab] / temperature` at `targets`.

  Padding targets (id 0) are masked out. Returns `(loss [], next-token accuracy [],
  number of target tokens [])`; accuracy is of the argmax over the full vocabulary.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  # One-hot contraction rather than a gather: it shards along `vocab` without all-gathers.
  target_lp = jnp.sum(log_probs * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1)
  weights = (targets != PAD_ID).astype(jnp.float32)
  num = jnp.maximum(jnp.sum(weights), 1.0)
  loss = -jnp.sum(target_lp * weights) / num
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return loss, jnp.sum(correct * weights) / num, jnp.sum(weights)


def listwise_softmax_loss(
  scores: jax.Array, valid: jax.Array, *, double_softmax: bool = False, temperature: float = 1.0
) -> jax.Array:
  """Listwise softmax cross-entropy with the positive in column 0, averaged over the batch.

  `scores [batch, 1 + negatives]`: sequence log-probabilities, positive first; `valid` (same
  shape, bool) marks real candidates (column 0 must be valid). Invalid columns get -inf and so
  no probability mass. `double_softmax` reproduces the reference implementation, which passes
  softmax probabilities into a cross-entropy that applies log-softmax again. `temperature`
  divides the scores first (< 1 concentrates the loss on the highest-scoring negatives).
  """
  masked = jnp.where(valid, scores / temperature, -jnp.inf)
  if double_softmax:
    probs = jax.nn.softmax(masked, axis=-1)
    masked = jnp.where(valid, probs, -jnp.inf)
  return -jnp.mean(jax.nn.log_softmax(masked, axis=-1)[:, 0])
