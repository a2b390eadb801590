"""Residual quantisation: assignment, straight-through sum, losses, gradients, usage, restarts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax import partitioning
from avg_jax.tokenizer import kmeans, quantizer


def _brute_force_rq(x, books, num_levels):
  """numpy: per row and level, the codeword index with the smallest L2 distance (loops)."""
  codes = np.zeros((len(x), num_levels), np.int64)
  total = np.zeros_like(x, dtype=np.float64)
  for i, row in enumerate(x.astype(np.float64)):
    residual = row.copy()
    for level in range(num_levels):
      book = books[0 if len(books) == 1 else level].astype(np.float64)
      dists = [np.sum((residual - c) ** 2) for c in book]
      codes[i, level] = int(np.argmin(dists))
      residual -= book[codes[i, level]]
      total[i] += book[codes[i, level]]
  return codes, total


@pytest.mark.parametrize("num_codebooks", [1, 3])
def test_assignment_is_brute_force_argmin(num_codebooks):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  books = rng.normal(size=(num_codebooks, 16, 8)).astype(np.float32)
  out = quantizer.residual_quantize(jnp.asarray(x), jnp.asarray(books), 3)
  expected_codes, expected_sum = _brute_force_rq(x, books, 3)
  np.testing.assert_array_equal(np.asarray(out.codes), expected_codes)
  np.testing.assert_array_equal(np.asarray(quantizer.quantize_codes(x, books, 3)), expected_codes)
  # The quantised vector (forward value) is the sum of the chosen codewords.
  np.testing.assert_allclose(np.asarray(out.quantized), expected_sum, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(quantizer.decode_codes(out.codes, books)), expected_sum, rtol=1e-5, atol=1e-5
  )


def test_nearest_code_distance_is_exact_squared_distance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(10, 4)).astype(np.float32)
  book = rng.normal(size=(6, 4)).astype(np.float32)
  codes, sq = quantizer.nearest_code(jnp.asarray(x), jnp.asarray(book))
  expected = np.sum((x - book[np.asarray(codes)]) ** 2, axis=1)
  np.testing.assert_allclose(np.asarray(sq), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(quantizer.squared_distances(x, book)),
    ((x[:, None] - book[None]) ** 2).sum(-1),
    rtol=1e-5,
    atol=1e-5,
  )


def test_residual_norm_decreases_level_by_level_on_fitted_codebooks():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(512, 6)).astype(np.float32) * np.array([4, 3, 2, 1, 1, 0.5], np.float32)
  books = kmeans.residual_kmeans(
    jax.random.key(0), jnp.asarray(x), 8, num_levels=4, num_codebooks=4, iters=15
  )
  out = quantizer.residual_quantize(jnp.asarray(x), books, 4)
  mean_sq = [float(jnp.mean(jnp.sum(r**2, -1))) for r in out.residuals]
  final = float(jnp.mean(jnp.sum((x - quantizer.decode_codes(out.codes, books)) ** 2, -1)))
  norms = mean_sq + [final]
  assert all(b < a for a, b in zip(norms, norms[1:])), norms


def test_straight_through_gradient_is_identity():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(5, 4)).astype(np.float32))
  books = jnp.asarray(rng.normal(size=(1, 7, 4)).astype(np.float32))
  jac = jax.jacobian(lambda v: quantizer.residual_quantize(v, books, 3).quantized)(x)
  np.testing.assert_array_equal(np.asarray(jac), np.eye(20).reshape(5, 4, 5, 4))


def test_losses_and_gradients_match_hand_computation():
  # One 1-d point x = 1; level-0 codewords {0, 3}, level-1 codewords {0.5, 2}.
  x = jnp.array([[1.0]])
  books = jnp.array([[[0.0], [3.0]], [[0.5], [2.0]]])
  out = quantizer.residual_quantize(x, books, 2, beta=0.25)
  np.testing.assert_array_equal(np.asarray(out.codes), [[0, 0]])
  # Level 0: r = 1, q = 0 -> (0 - 1)^2 + 0.25 (0 - 1)^2 = 1.25.
  # Level 1: r = 1, q = 0.5 -> 0.25 + 0.25 * 0.25 = 0.3125. Mean over levels: 0.78125.
  np.testing.assert_allclose(float(out.quant_loss), 0.78125, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out.quantized), [[0.5]])
  np.testing.assert_allclose(np.asarray(out.errors), [[1.0], [0.25]])
  loss = lambda v, b: quantizer.residual_quantize(v, b, 2, beta=0.25).quant_loss
  grad_x, grad_books = jax.grad(loss, argnums=(0, 1))(x, books)
  # Only level 0's commitment reaches x (the reference passes sg(r - q) on): 0.25 * 2 * (1 - 0) / 2.
  np.testing.assert_allclose(np.asarray(grad_x), [[0.25]], rtol=1e-6)
  # Codebook terms: d/dc (c - r)^2 / 2 levels = (c - r): level 0 -> -1, level 1 -> -0.5.
  np.testing.assert_allclose(np.asarray(grad_books), [[[-1.0], [0.0]], [[-0.5], [0.0]]], rtol=1e-6)


def test_usage_statistics():
  codes = jnp.array([[0, 1], [1, 1], [2, 1], [3, 1]])
  counts = quantizer.code_counts(codes, 4)
  np.testing.assert_array_equal(np.asarray(counts), [[1, 1, 1, 1], [0, 4, 0, 0]])
  np.testing.assert_allclose(np.asarray(quantizer.perplexity(counts)), [4.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(quantizer.unused_share(counts)), [0.0, 0.75])
  # Two codes used 3:1 -> exp(H) with H = -(0.75 ln 0.75 + 0.25 ln 0.25).
  h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  counts = quantizer.code_counts(jnp.array([[0], [0], [0], [2]]), 4)
  np.testing.assert_allclose(float(quantizer.perplexity(counts)[0]), np.exp(h), rtol=1e-6)


def test_dead_codes_take_the_worst_quantised_inputs():
  books = jnp.array([[[0.0, 0.0], [10.0, 10.0], [20.0, 20.0]]])
  x = jnp.array([[0.1, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 0.2]])
  out = quantizer.residual_quantize(x, books, 1)
  last_used = jnp.array([[0, 0, 5]])  # code 2 used at step 5; code 1 at step 0
  step = jnp.array(7)
  new_books, new_last, restarted = quantizer.restart_dead_codes(
    books, last_used, step, out, dead_after=3
  )
  # Every input picks code 0 (used now); code 1 is 7 steps unused (dead), code 2 only 2.
  assert int(restarted) == 1
  np.testing.assert_allclose(np.asarray(new_books[0, 1]), [3.0, 0.0])  # largest error input
  np.testing.assert_allclose(np.asarray(new_books[0, [0, 2]]), np.asarray(books[0, [0, 2]]))
  np.testing.assert_array_equal(np.asarray(new_last), [[7, 7, 5]])


def test_sharded_batch_matches_unsharded():
  mesh = partitioning.make_mesh({"data": 8})
  rng = np.random.default_rng(4)
  x = rng.normal(size=(32, 8)).astype(np.float32)
  books = rng.normal(size=(1, 16, 8)).astype(np.float32)
  fn = jax.jit(
    lambda v, b: quantizer.residual_quantize(v, b, 3),
    in_shardings=(
      partitioning.logical_sharding(mesh, "batch", None),
      partitioning.logical_sharding(mesh, "levels", "codebook", "code_dim"),
    ),
  )
  sharded = fn(x, books)
  plain = quantizer.residual_quantize(jnp.asarray(x), jnp.asarray(books), 3)
  np.testing.assert_array_equal(np.asarray(sharded.codes), np.asarray(plain.codes))
  np.testing.assert_allclose(float(sharded.quant_loss), float(plain.quant_loss), rtol=1e-5)
