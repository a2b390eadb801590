"""k-means in JAX: k-means++ or random initialisation, then Lloyd iterations, all jitted.

Points carry weights (`[N]`, 0 for padding rows) so groups of different sizes can share one
compiled program by padding to a common length. An empty cluster keeps its previous centroid:
with that rule neither the assignment nor the update step can increase the objective.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp

from avg_jax.tokenizer import quantizer


@flax.struct.dataclass
class KMeansResult:
  centroids: jax.Array  # [k, D]
  assignments: jax.Array  # int32[N] nearest centroid of each point (after the last update)
  objectives: jax.Array  # [iters + 1] weighted mean squared distance: at init, after each step


def _weights(x: jax.Array, weights: jax.Array | None) -> jax.Array:
  return jnp.ones(x.shape[:1], x.dtype) if weights is None else weights.astype(x.dtype)


def kmeans_plus_plus(
  key: jax.Array, x: jax.Array, k: int, weights: jax.Array | None = None
) -> jax.Array:
  """k-means++ seeding: `x [N, D]` -> `[k, D]` centroids drawn from the (weighted) points.

  Each new centroid is drawn with probability proportional to weight * squared distance to
  the nearest centroid chosen so far; when every point already coincides with a centroid
  (fewer distinct points than k) the draw falls back to the weights alone.
  """
  w = _weights(x, weights)
  n, d = x.shape
  keys = jax.random.split(key, k)
  log_w = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)  # [N]
  first = jax.random.categorical(keys[0], log_w)
  centroids = jnp.zeros((k, d), x.dtype).at[0].set(x[first])
  min_sq = jnp.sum(jnp.square(x - x[first]), axis=-1)  # [N]

  def body(i, carry):
    centroids, min_sq = carry
    mass = w * min_sq  # [N]
    logits = jnp.where(
      jnp.sum(mass) > 0,
      jnp.where(mass > 0, jnp.log(jnp.where(mass > 0, mass, 1.0)), -jnp.inf),
      log_w,
    )
    idx = jax.random.categorical(keys[i], logits)
    centroids = centroids.at[i].set(x[idx])
    min_sq = jnp.minimum(min_sq, jnp.sum(jnp.square(x - x[idx]), axis=-1))
    return centroids, min_sq

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_sq))
  return centroids


def random_init(
  key: jax.Array, x: jax.Array, k: int, weights: jax.Array | None = None
) -> jax.Array:
  """`k` distinct points drawn without replacement (proportionally to weight): `[k, D]`."""
  w = _weights(x, weights)
  # Gumbel-top-k draws k distinct indices with probabilities proportional to w.
  gumbel = jax.random.gumbel(key, w.shape)
  scores = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)) + gumbel, -jnp.inf)
  _, idx = jax.lax.top_k(scores, k)
  return x[idx]


def lloyd_step(
  x: jax.Array,
  centroids: jax.Array,
  weights: jax.Array | None = None,
  precision: jax.lax.Precision | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One assignment + update step.

  Returns (new centroids [k, D], assignments int32[N], objective of the *old* centroids []),
  the objective coming free with the assignment.
  """
  w = _weights(x, weights)
  k = centroids.shape[0]
  assign, sq = quantizer.nearest_code(x, centroids, precision=precision)  # [N]
  # Segment sums, not a [k, N] one-hot matmul: on CPU the matmul doubled each iteration.
  mass = jax.ops.segment_sum(w, assign, num_segments=k)  # [k]
  sums = jax.ops.segment_sum(w[:, None] * x, assign, num_segments=k)  # [k, D]
  means = sums / jnp.maximum(mass, 1e-12)[:, None]
  old_objective = jnp.sum(w * sq) / jnp.maximum(jnp.sum(w), 1e-12)
  return jnp.where(mass[:, None] > 0, means, centroids), assign, old_objective


@functools.partial(jax.jit, static_argnames=("iters", "precision"))
def lloyd(
  x: jax.Array,
  centroids: jax.Array,
  weights: jax.Array | None = None,
  *,
  iters: int,
  precision: jax.lax.Precision | None = None,
) -> KMeansResult:
  """`iters` Lloyd steps from `centroids [k, D]`; records the objective before and after each."""

  def body(centroids, _):
    new, _, old_objective = lloyd_step(x, centroids, weights, precision)
    return new, old_objective

  centroids, history = jax.lax.scan(body, centroids, None, length=iters)  # [iters]
  w = _weights(x, weights)
  assign, sq = quantizer.nearest_code(x, centroids, precision=precision)
  final = jnp.sum(w * sq) / jnp.maximum(jnp.sum(w), 1e-12)
  return KMeansResult(
    centroids=centroids, assignments=assign, objectives=jnp.concatenate([history, final[None]])
  )


@functools.partial(jax.jit, static_argnames=("k", "iters", "init", "precision"))
def kmeans(
  key: jax.Array,
  x: jax.Array,
  k: int,
  *,
  iters: int,
  init: str = "kmeans++",
  weights: jax.Array | None = None,
  precision: jax.lax.Precision | None = None,
) -> KMeansResult:
  """k-means of `x [N, D]` into `k` clusters: init ("kmeans++" | "random") + `iters` Lloyd steps."""
  if init == "kmeans++":
    centroids = kmeans_plus_plus(key, x, k, weights)
  elif init == "random":
    centroids = random_init(key, x, k, weights)
  else:
    raise ValueError(f"kmeans init must be 'kmeans++' or 'random', got {init!r}")
  return lloyd(x, centroids, weights, iters=iters, precision=precision)


def residual_kmeans(
  key: jax.Array,
  x: jax.Array,
  k: int,
  num_levels: int,
  num_codebooks: int,
  *,
  iters: int,
  init: str = "kmeans++",
) -> jax.Array:
  """Codebooks `[C, k, D]` for residual quantisation of `x [N, D]`.

  One shared codebook (`C = 1`) is fit to `x` itself, as the reference fits its single
  quantiser on the first batch it sees. Per-level codebooks (`C = L`) are fit level by level
  to the residual left by the levels before.
  """
  if num_codebooks == 1:
    return kmeans(key, x, k, iters=iters, init=init).centroids[None]
  books = []
  residual = x
  for level_key in jax.random.split(key, num_levels):
    result = kmeans(level_key, residual, k, iters=iters, init=init)
    books.append(result.centroids)
    residual = residual - jnp.take(result.centroids, result.assignments, axis=0)
  return jnp.stack(books)
