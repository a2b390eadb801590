"""avg_hybrid's weight choice on validation: similarities, host re-ranking, the choice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avg_jax.decoding import search
from avg_jax.evaluation import hybrid


def test_candidate_similarities_by_hand():
  image_ids = np.array([10, 11, 12])
  image_emb = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]], np.float32)  # normalised inside
  query_emb = np.array([[1.0, 0.0], [0.0, 5.0]], np.float32)
  ids = np.array([[10, 12, -1], [11, 10, 12]])
  sim = hybrid.candidate_similarities(ids, query_emb, image_ids, image_emb)
  r = 2**-0.5
  np.testing.assert_allclose(sim, [[1.0, r, 0.0], [1.0, 0.0, r]], atol=1e-6)


def test_rerank_by_hand_and_empty_slots_last():
  ids = np.array([[3, 5, 7, -1]])
  scores = np.array([[-1.0, -1.5, -3.0, -np.inf]])
  sim = np.array([[0.1, 0.5, 0.9, 0.0]])
  # weight 2: fused -0.8, -0.5, -1.2 -> 5, 3, 7, then the empty slot.
  assert hybrid.rerank(ids, scores, sim, 2.0).tolist() == [[5, 3, 7, -1]]
  assert hybrid.rerank(ids, scores, sim, 0.0).tolist() == [[3, 5, 7, -1]]


def test_host_rerank_is_the_device_search_rescoring():
  rng = np.random.default_rng(0)
  ids = rng.permutation(50)[:40].reshape(4, 10)
  ids[1, 7:] = -1
  scores = np.sort(rng.normal(-3, 1, (4, 10)), axis=1)[:, ::-1].astype(np.float32)
  scores[1, 7:] = -np.inf
  sim = rng.uniform(-1, 1, (4, 10)).astype(np.float32)
  for w in (0.0, 0.7, 3.0, 100.0):
    device, _, _ = jax.device_get(
      search.hybrid_rescore(ids, scores, jnp.where(ids >= 0, sim, -np.inf), w, 10)
    )
    np.testing.assert_array_equal(hybrid.rerank(ids, scores, sim, w), device)


def test_choose_weight_takes_the_best_r1_and_the_smaller_weight_on_ties():
  # Query 0's image (7) is second by log-prob but most similar; query 1's is first anyway.
  ids = np.array([[3, 7], [4, 8]])
  scores = np.array([[-1.0, -2.0], [-1.0, -2.0]])
  sim = np.array([[0.0, 0.5], [0.5, 0.0]])
  true = np.array([7, 4])
  weight, table = hybrid.choose_weight(ids, scores, sim, true, [8.0, 0.0, 4.0, 1.0], ks=(1, 2))
  assert [row["weight"] for row in table] == [0.0, 1.0, 4.0, 8.0]
  assert [row["R@1"] for row in table] == [50.0, 50.0, 100.0, 100.0]  # fused -1.0 vs -2+0.5w
  assert weight == 4.0  # ties with 8 go to the weight closer to plain AVG
  with pytest.raises(ValueError):
    hybrid.choose_weight(ids, scores, sim, true, [])
