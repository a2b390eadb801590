"""The two-tower side's ANN index (faiss HNSW) on a tiny index: exact where it can be."""

import numpy as np
import pytest

from avg_jax.evaluation import ann


def test_hnsw_finds_the_exact_neighbours_of_a_tiny_index():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(200, 16)).astype(np.float32)
  queries = items[:5] + 0.01 * rng.normal(size=(5, 16)).astype(np.float32)
  index = ann.HnswIndex(items, m=8, ef_construction=40)
  scores, ids = index.search(queries, 3, ef_search=200)   # ef >= N: exhaustive in effect
  cosine = ann.normalize(queries) @ ann.normalize(items).T
  exact = np.argsort(-cosine, axis=1, kind="stable")[:, :3]
  assert ann.recall_against_exact(ids, exact) == 1.0
  assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
  np.testing.assert_allclose(scores, np.take_along_axis(cosine, exact, 1), atol=1e-5)
  assert index.build_s >= 0 and index.nbytes > items.nbytes
  with pytest.raises(ValueError, match="k=201"):
    index.search(queries, 201)


def test_recall_against_exact_by_hand():
  assert ann.recall_against_exact(np.array([[1, 2], [3, 4]]), np.array([[2, 9], [4, 3]])) == 0.75
  with pytest.raises(ValueError, match="differ"):
    ann.recall_against_exact(np.zeros((1, 2)), np.zeros((2, 2)))
