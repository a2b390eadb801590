"""Distractor identifiers for the efficiency benchmark."""

import numpy as np
import pytest

from avg_jax.evaluation import efficiency
from avg_jax.evaluation.efficiency import distractor_codes


def test_distinct_distractors_avoid_the_real_codes_and_each_other():
  real = np.array([[0, 0, 1], [3, 2, 1]])
  fake = distractor_codes(real, (4, 3, 2), 18, seed=1)
  assert fake.shape == (18, 3) and fake.dtype == np.int32
  assert (fake >= 0).all() and (fake < np.array([4, 3, 2])).all()
  every = np.concatenate([real, fake])
  assert len(np.unique(every, axis=0)) == 20
  np.testing.assert_array_equal(fake, distractor_codes(real, (4, 3, 2), 18, seed=1))
  with pytest.raises(ValueError, match="do not fit"):
    distractor_codes(real, (4, 3, 2), 21)


def test_semantic_distractors_may_repeat_beyond_the_space():
  fake = distractor_codes(np.zeros((1, 2), int), (3, 2), 100, seed=0, distinct=False)
  assert fake.shape == (100, 2) and len(np.unique(fake, axis=0)) == 6


def test_distractor_embeddings_follow_the_real_mean_and_covariance():
  rng = np.random.default_rng(3)
  real = rng.normal(0, 1, (500, 4)) @ np.array(
    [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 0.1]]
  ) + np.array([5, -1, 0, 2])
  fake = efficiency.distractor_embeddings(real, 40000, seed=0)
  assert fake.shape == (40000, 4) and fake.dtype == np.float32
  np.testing.assert_allclose(fake.mean(0), real.mean(0), atol=0.05)
  np.testing.assert_allclose(np.cov(fake, rowvar=False), np.cov(real, rowvar=False), atol=0.08)
  items = efficiency.index_items(real, 600, seed=0)
  np.testing.assert_array_equal(items[:500], real.astype(np.float32))
  assert items.shape == (600, 4)


def test_exact_top_k_across_chunks_by_hand():
  items = np.array([[1, 0], [0, 1], [1, 1], [-1, 0], [1, 0.1]], np.float32)
  queries = np.array([[1, 0], [0, 1]], np.float32)
  # cosines to [1, 0]: 1, 0, .707, -1, .995 -> 0, 4, 2; to [0, 1]: 0, 1, .707, 0, .0995 -> 1, 2, 4
  got = efficiency.exact_top_k(items, queries, 3, chunk=2)
  assert got.tolist() == [[0, 4, 2], [1, 2, 4]]


def test_fastest_at_recall_picks_what_a_user_would_deploy():
  rows = [
    {"num_items": 10, "ef_search": 16, "queries_per_s": 900.0, "recall_at_k": 0.90},
    {"num_items": 10, "ef_search": 64, "queries_per_s": 500.0, "recall_at_k": 0.97},
    {"num_items": 10, "ef_search": 256, "queries_per_s": 200.0, "recall_at_k": 0.99},
    {"num_items": 99, "ef_search": 16, "queries_per_s": 800.0, "recall_at_k": 0.60},
    {"num_items": 99, "ef_search": 64, "queries_per_s": 300.0, "recall_at_k": 0.80},
  ]
  chosen = efficiency.fastest_at_recall(rows, 0.95)
  assert [(r["num_items"], r["ef_search"]) for r in chosen] == [(10, 64), (99, 64)]


def test_hnsw_rows_on_a_tiny_index():
  rng = np.random.default_rng(0)
  real = rng.normal(0, 1, (50, 8)).astype(np.float32)
  queries = rng.normal(0, 1, (12, 8)).astype(np.float32)
  rows = efficiency.ann_queries_per_s(
    real,
    queries,
    (50, 200),
    k=5,
    batch_size=4,
    m=8,
    ef_construction=40,
    ef_search=(5, 200),
    encode_s_per_query=0.001,
    repeats=1,
  )
  assert [(r["num_items"], r["ef_search"]) for r in rows] == [
    (50, 5),
    (50, 200),
    (200, 5),
    (200, 200),
  ]
  for r in rows:
    assert 0.0 <= r["recall_at_k"] <= 1.0 and r["index_bytes"] > 0 and r["build_s"] >= 0
    assert r["queries_per_s"] < r["search_only_queries_per_s"]  # the text tower is added
  # A candidate list as large as the index visits (nearly) everything: (near-)exact.
  assert min(r["recall_at_k"] for r in rows if r["ef_search"] == 200) >= 0.9
