"""k-means: monotone objective, numpy parity, seeding, weights as padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax.tokenizer import kmeans


def _numpy_lloyd(x, centroids, iters):
  """Textbook Lloyd in float64: assign to nearest, move to the mean, empty clusters stay."""
  x = x.astype(np.float64)
  c = centroids.astype(np.float64).copy()
  objectives = []
  for _ in range(iters + 1):
    d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    assign = d.argmin(1)
    objectives.append(d.min(1).mean())
    new = c.copy()
    for j in range(len(c)):
      if (assign == j).any():
        new[j] = x[assign == j].mean(0)
    c = new
  return c[:], np.array(objectives), assign


def _blobs(seed, n_per=20, centers=((0, 0), (5, 5), (-5, 5), (5, -5))):
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.normal(size=(n_per, 2)) * 0.7 + c for c in centers]).astype(np.float32)


def test_lloyd_matches_numpy_reference():
  x = _blobs(0)
  init = x[[0, 1, 2, 3]]  # four points of the first blob: a poor start Lloyd must fix
  result = kmeans.lloyd(jnp.asarray(x), jnp.asarray(init), iters=10)
  ref_c, ref_obj, _ = _numpy_lloyd(x, init, 10)
  np.testing.assert_allclose(np.asarray(result.centroids), ref_c, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(result.objectives), ref_obj, rtol=1e-5)
  d = ((x[:, None] - ref_c[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(result.assignments), d.argmin(1))


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_objective_never_increases(init):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(300, 5)).astype(np.float32))
  result = kmeans.kmeans(jax.random.key(3), x, 16, iters=25, init=init)
  obj = np.asarray(result.objectives)
  assert obj.shape == (26,)
  # Each step can only lower the objective; allow float32 rounding of equal values.
  assert np.all(obj[1:] <= obj[:-1] * (1 + 1e-6)), obj
  assert obj[-1] < obj[0]


def test_kmeans_plus_plus_finds_separated_clusters():
  x = _blobs(2)
  result = kmeans.kmeans(jax.random.key(0), jnp.asarray(x), 4, iters=10)
  labels = np.asarray(result.assignments).reshape(4, 20)
  # Each blob ends in one cluster of its own.
  assert all(len(set(row)) == 1 for row in labels)
  assert len(set(labels[:, 0])) == 4


def test_seeding_draws_distinct_points():
  x = jnp.asarray(np.arange(40, dtype=np.float32).reshape(20, 2))
  for init_fn in (kmeans.kmeans_plus_plus, kmeans.random_init):
    c = np.asarray(init_fn(jax.random.key(1), x, 8))
    assert len(np.unique(c, axis=0)) == 8
    assert all(any((row == p).all() for p in np.asarray(x)) for row in c)


def test_zero_weight_padding_does_not_change_the_result():
  x = _blobs(3)
  padded = np.concatenate([x, np.full((48, 2), 100.0, np.float32)])
  weights = np.concatenate([np.ones(len(x)), np.zeros(48)]).astype(np.float32)
  init = x[[0, 25, 45, 65]]
  plain = kmeans.lloyd(jnp.asarray(x), jnp.asarray(init), iters=8)
  masked = kmeans.lloyd(jnp.asarray(padded), jnp.asarray(init), jnp.asarray(weights), iters=8)
  np.testing.assert_allclose(
    np.asarray(masked.centroids), np.asarray(plain.centroids), rtol=1e-6, atol=1e-6
  )
  np.testing.assert_allclose(np.asarray(masked.objectives), np.asarray(plain.objectives), rtol=1e-6)
  seeded = np.asarray(
    kmeans.kmeans_plus_plus(jax.random.key(0), jnp.asarray(padded), 4, jnp.asarray(weights))
  )
  assert not (seeded == 100.0).any()  # zero-weight rows are never drawn


@pytest.mark.parametrize("num_codebooks", [1, 3])
def test_residual_kmeans_shapes(num_codebooks):
  x = jnp.asarray(np.random.default_rng(4).normal(size=(64, 3)).astype(np.float32))
  books = kmeans.residual_kmeans(jax.random.key(0), x, 5, 3, num_codebooks, iters=3)
  assert books.shape == (num_codebooks, 5, 3)
