"""Brute-force cosine top-k: equal to a numpy argsort (ties: lower index first), chunked and
sharded over 8 fake devices."""

import numpy as np
import pytest

from avg_jax import partitioning
from avg_jax.encoders import retrieval


def _data_with_ties(seed, num_items=300, num_queries=7, dim=16, num_prototypes=40):
  """Items drawn from a few prototype rows, so equal scores (exact ties) are common."""
  rng = np.random.default_rng(seed)
  prototypes = rng.integers(-4, 5, size=(num_prototypes, dim)).astype(np.float32)
  items = prototypes[rng.integers(0, num_prototypes, size=num_items)]
  items *= rng.choice([1.0, 2.0, 0.5], size=(num_items, 1)).astype(np.float32)  # same cosine
  queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
  return queries, items, prototypes


def _numpy_top_k(queries, items, k):
  unit = items / np.linalg.norm(items, axis=1, keepdims=True)
  q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  scores = q.astype(np.float64) @ unit.astype(np.float64).T
  # Scores of scaled copies of one prototype are equal up to rounding: round them together.
  scores = np.round(scores, 6)
  order = np.stack([np.lexsort((np.arange(len(items)), -row)) for row in scores])
  return order[:, :k]


def test_numpy_reference_has_ties():
  queries, items, _ = _data_with_ties(0)
  scores = np.round(queries @ (items / np.linalg.norm(items, axis=1, keepdims=True)).T, 5)
  assert any(len(np.unique(row)) < len(row) for row in scores)


@pytest.mark.parametrize("chunk_size,k", [(1000, 10), (37, 10), (4, 9), (64, 1), (300, 300)])
def test_single_device_equals_argsort(chunk_size, k):
  queries, items, _ = _data_with_ties(1)
  index = retrieval.BruteForceIndex(items, chunk_size=chunk_size)
  scores, ids = index.search(queries, k)
  np.testing.assert_array_equal(ids, _numpy_top_k(queries, items, k))
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_distinct_scores_without_rounding():
  rng = np.random.default_rng(2)
  items = rng.normal(size=(500, 32)).astype(np.float32)
  queries = rng.normal(size=(5, 32)).astype(np.float32)
  _, ids = retrieval.BruteForceIndex(items, chunk_size=64).search(queries, 10)
  unit = items / np.linalg.norm(items, axis=1, keepdims=True)
  expected = np.argsort(-(queries @ unit.T), axis=1, kind="stable")[:, :10]
  np.testing.assert_array_equal(ids, expected)


@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 4, "fsdp": 2}])
@pytest.mark.parametrize("num_items,chunk_size,k", [(300, 16, 10), (301, 1000, 5), (5, 8, 5)])
def test_sharded_equals_unsharded(mesh_shape, num_items, chunk_size, k):
  queries, items, _ = _data_with_ties(3, num_items=num_items)
  mesh = partitioning.make_mesh(dict({"data": 1, "fsdp": 1, "model": 1}, **mesh_shape))
  sharded = retrieval.BruteForceIndex(items, mesh=mesh, chunk_size=chunk_size)
  assert sharded.num_shards == 8
  assert len(sharded.items.sharding.device_set) == 8
  single = retrieval.BruteForceIndex(items, chunk_size=chunk_size)
  s_scores, s_ids = sharded.search(queries, k)
  u_scores, u_ids = single.search(queries, k)
  np.testing.assert_array_equal(s_ids, u_ids)
  np.testing.assert_allclose(s_scores, u_scores, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(s_ids, _numpy_top_k(queries, items, k))


def test_bad_k_and_queries():
  index = retrieval.BruteForceIndex(np.eye(4, dtype=np.float32))
  with pytest.raises(ValueError, match="k=5"):
    index.search(np.ones((1, 4), np.float32), 5)
  with pytest.raises(ValueError, match=r"\[Q, 4\]"):
    index.search(np.ones((1, 3), np.float32), 2)


def test_top_k_indices_batches_queries():
  queries, items, _ = _data_with_ties(4, num_queries=11)
  ids = retrieval.top_k_indices(queries, items, 3, chunk_size=50, query_batch=4)
  np.testing.assert_array_equal(ids, _numpy_top_k(queries, items, 3))
