"""The two-tower side's ANN index (faiss HNSW) on a tiny index: exact where it can be."""

import subprocess
import sys

import numpy as np
import pytest

from avg_jax.evaluation import ann


def test_hnsw_finds_the_exact_neighbours_of_a_tiny_index():
  rng = np.random.default_rng(0)
  items = rng.normal(size=(200, 16)).astype(np.float32)
  queries = items[:5] + 0.01 * rng.normal(size=(5, 16)).astype(np.float32)
  index = ann.HnswIndex(items, m=8, ef_construction=40)
  scores, ids = index.search(queries, 3, ef_search=200)  # ef >= N: exhaustive in effect
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


def test_loading_faiss_prints_nothing_at_the_clis_info_level():
  # faiss's loader logged `Could not load library with AVX512 support due to:
  # ModuleNotFoundError("No module named 'faiss.swigfaiss_avx512'")` (and AVX2) at INFO, which
  # the CLI's INFO-level logging printed into every evaluate log. A fresh process: faiss loads
  # once per process.
  code = (
    "import logging; logging.basicConfig(level=logging.INFO); "
    "from avg_jax.evaluation import ann; ann._faiss(); "
    "print(ann.HnswIndex([[1.0, 0.0], [0.0, 1.0]]).num_items)"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
  )
  assert done.stdout.strip() == "2"
  assert done.stderr == ""
