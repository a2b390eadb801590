"""`avg_hybrid`: choosing the fusion weight of generative score and dual-encoder similarity.

The search re-ranks the beam's images by `log-prob + weight x cosine(query, image)`
(`decoding.search.hybrid_rescore`, B dot products per query, independent of N). The weight is
chosen on validation: one plain search returns each query's beam (all B images with their
log-probs), and every candidate weight re-ranks that same beam on the host, which gives exactly
the ranking the device search would return for that weight, at the cost of one search.
"""

from collections.abc import Sequence

import numpy as np

from avg_jax.evaluation.recall import recall_at_k


def candidate_similarities(
  item_ids: np.ndarray, query_emb: np.ndarray, image_ids: np.ndarray, image_emb: np.ndarray
) -> np.ndarray:
  """`float32[Q, B]`: cosine of each query `[Q, D]` with each of its beam's images
  `item_ids [Q, B]` (-1 = empty slot, similarity 0), given the index's `image_ids [N]` and
  `image_emb [N, D]` (rows L2-normalised here, as the search does)."""
  image_ids, ids = np.asarray(image_ids), np.asarray(item_ids)
  # Rows of the ids by a sorted lookup (vectorised over all Q x B slots); unknown ids -> -1.
  order = np.argsort(image_ids, kind="stable")
  pos = np.clip(np.searchsorted(image_ids[order], ids), 0, len(order) - 1)
  rows = np.where(image_ids[order][pos] == ids, order[pos], -1)
  unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  img = unit(np.asarray(image_emb, np.float32))
  qry = unit(np.asarray(query_emb, np.float32))
  sim = np.einsum("qd,qbd->qb", qry, img[np.maximum(rows, 0)])
  return np.where(rows >= 0, sim, 0.0).astype(np.float32)


def rerank(item_ids: np.ndarray, scores: np.ndarray, sim: np.ndarray, weight: float) -> np.ndarray:
  """`int[Q, B]` the beam's images ordered by `score + weight * sim` (ties keep the beam's
  order; empty slots, id -1, last) — the host twin of `search.hybrid_rescore`."""
  fused = np.where(np.asarray(item_ids) >= 0, scores + weight * sim, -np.inf)
  order = np.argsort(-fused, axis=-1, kind="stable")
  return np.take_along_axis(np.asarray(item_ids), order, axis=-1)


def choose_weight(
  item_ids: np.ndarray,
  scores: np.ndarray,
  sim: np.ndarray,
  true_ids: np.ndarray,
  weights: Sequence[float],
  ks: Sequence[int] = (1, 5, 10),
) -> tuple[float, list[dict]]:
  """The weight of `weights` with the best R@1 on these (validation) queries, ties to the
  smaller weight (closer to plain AVG), and the table `[{"weight", "R@1", ...}]`.

  `item_ids`, `scores`, `sim`: `[Q, B]` each query's whole beam from a plain search;
  `true_ids [Q]`."""
  if not weights:
    raise ValueError("choose_weight needs at least one candidate weight")
  table = []
  for w in sorted(float(w) for w in weights):
    ranked = rerank(item_ids, scores, sim, w)
    table.append({"weight": w, **recall_at_k(ranked, true_ids, ks)})
  best = max(table, key=lambda row: (row["R@1"], -row["weight"]))
  return best["weight"], table
