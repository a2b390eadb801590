"""Recall@K (Karpathy protocol) on a hand-made similarity matrix."""

import numpy as np
import pytest

from avg_jax.evaluation.recall import recall_at_k


def test_recall_on_hand_made_similarities():
  # 3 images (ids 10, 20, 30), 2 captions each: 6 queries. Similarity [query, image].
  sims = np.array(
    [
      [0.9, 0.1, 0.0],  # caption of 10: rank 1
      [0.2, 0.8, 0.1],  # caption of 10: rank 2
      [0.1, 0.7, 0.3],  # caption of 20: rank 1
      [0.6, 0.3, 0.5],  # caption of 20: rank 3
      [0.1, 0.2, 0.4],  # caption of 30: rank 1
      [0.5, 0.4, 0.45],  # caption of 30: rank 2
    ]
  )
  image_ids = np.array([10, 20, 30])
  ranked = image_ids[np.argsort(-sims, axis=1)]
  true = np.array([10, 10, 20, 20, 30, 30])
  got = recall_at_k(ranked, true, ks=(1, 2, 3))
  assert got == pytest.approx({"R@1": 50.0, "R@2": 100 * 5 / 6, "R@3": 100.0})


def test_missing_results_and_duplicates():
  ranked = np.array([[-1, -1], [7, 7], [3, 8]])
  got = recall_at_k(ranked, np.array([5, 7, 8]), ks=(1, 2))
  assert got == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3})


def test_bad_shapes():
  with pytest.raises(ValueError, match="R@10 needs at least 10"):
    recall_at_k(np.zeros((2, 5), int), np.zeros(2, int))
  with pytest.raises(ValueError, match="expected ranked_ids"):
    recall_at_k(np.zeros((2, 5), int), np.zeros(3, int), ks=(1,))
  with pytest.raises(ValueError, match="zero queries"):
    recall_at_k(np.zeros((0, 5), int), np.zeros(0, int), ks=(1,))


def test_code_level_recall_hand_example():
  from avg_jax.evaluation.recall import code_recall_at_k

  # 3 queries, 3 generated sequences each (P = 3: two semantic codes + a disambiguation one).
  sequences = np.array(
    [
      [[1, 2, 0], [1, 3, 0], [2, 2, 1]],  # true codes (1, 3): second sequence
      [[4, 4, 1], [4, 4, 0], [0, 0, 0]],  # true codes (4, 4): first (any disambiguation)
      [[0, 1, 0], [-1, -1, -1], [-1, -1, -1]],
    ]
  )  # true codes (5, 5): never generated
  true_codes = np.array([[1, 3], [4, 4], [5, 5]])
  got = code_recall_at_k(sequences, true_codes, ks=(1, 2, 3))
  assert got == pytest.approx({"code R@1": 100 / 3, "code R@2": 200 / 3, "code R@3": 200 / 3})
  with pytest.raises(ValueError, match="needs at least 5"):
    code_recall_at_k(sequences, true_codes, ks=(5,))


def test_paired_difference_by_hand():
  from avg_jax.evaluation.recall import hits_at_k, paired_difference

  ranked = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
  np.testing.assert_array_equal(hits_at_k(ranked, np.array([2, 3, 9, 8]), 1), [0, 1, 0, 0])
  a = np.array([1.0, 1.0, 0.0, 0.0])
  b = np.array([0.0, 1.0, 0.0, 1.0])
  d = paired_difference(a, b)  # differences +1, 0, 0, -1: mean 0 points
  assert d["diff"] == 0.0 and d["ci95"][0] < 0 < d["ci95"][1]
  assert paired_difference(a, a)["ci95"] == [0.0, 0.0]
