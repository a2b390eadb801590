"""The generator's own query embedding: a linear head on T5's encoder (for `avg_hybrid`).

avg_hybrid re-scores the beam's images by the cosine of a query embedding and the images'
dual-encoder embeddings. The dual encoder's text tower gives the query embedding at the cost
of a second transformer pass per query (on the smoke CPU about a quarter of a whole AVG
search). The generator's encoder reads the query anyway: a linear map of its mean-pooled
states, fitted in closed form (ridge regression) to the dual encoder's embeddings of the
training captions, predicts that embedding for one `[d_model, D]` matmul inside the search
program (`decode.hybrid_query = "generator"`; NOTES.md has the accuracy of each).
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.artifacts import io
from avg_jax.errors import UserError


@flax.struct.dataclass
class QueryHead:
  """`embedding = pooled @ weight + bias`: `weight float32[d_model, D]`, `bias float32[D]`."""

  weight: jax.Array
  bias: jax.Array

  @property
  def dim(self) -> int:
    return int(self.weight.shape[-1])


def pooled_states(encoded: jax.Array, input_tokens: jax.Array) -> jax.Array:
  """`float32[B, d_model]`: the mean of `encoded [B, S, d_model]` over the non-padding
  positions of `input_tokens int[B, S]` (0 = padding; an all-padding row gives zeros)."""
  mask = (input_tokens != 0)[..., None].astype(jnp.float32)
  total = jnp.sum(encoded.astype(jnp.float32) * mask, axis=1)
  return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def predict(head: QueryHead, pooled: "jax.Array | np.ndarray") -> jax.Array:
  """`float32[B, D]` query embeddings (not normalised; the search normalises) from
  `pooled [B, d_model]`."""
  return jnp.asarray(pooled, jnp.float32) @ head.weight + head.bias


def fit(features: np.ndarray, targets: np.ndarray, l2: float) -> QueryHead:
  """Ridge regression of the L2-normalised `targets [N, D]` on `features [N, d]` (the bias is
  not penalised), solved in float64 on the host: `(X'X + l2 I) W = X'Y`."""
  x = np.asarray(features, np.float64)
  y = np.asarray(targets, np.float64)
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or not len(x):
    raise UserError(
      f"query head: need matching non-empty [N, d] features and [N, D] targets, "
      f"got {x.shape} and {y.shape}"
    )
  if l2 < 0:
    raise UserError(f"query head: l2 must be >= 0, got {l2}")
  y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
  # Centring removes the bias from the penalised system (the usual ridge intercept).
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  gram = xc.T @ xc + l2 * np.eye(x.shape[1])
  weight = np.linalg.lstsq(gram, xc.T @ yc, rcond=None)[0]
  bias = y_mean - x_mean @ weight
  return QueryHead(weight=jnp.asarray(weight, jnp.float32), bias=jnp.asarray(bias, jnp.float32))


def save(path: str, head: QueryHead) -> None:
  io.write_npz(path, weight=np.asarray(head.weight), bias=np.asarray(head.bias))


def load(path: str, *, remedy: str = "") -> QueryHead:
  arrays = io.read_npz(path, ("weight", "bias"), remedy=remedy)
  return QueryHead(
    weight=jnp.asarray(arrays["weight"], jnp.float32), bias=jnp.asarray(arrays["bias"], jnp.float32)
  )
