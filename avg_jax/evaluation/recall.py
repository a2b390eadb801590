"""Recall@K for text-to-image retrieval (Karpathy protocol).

Every caption of a test image is one query; the query's hit is that image. Recall@K is the
percentage of queries whose image appears among the first K retrieved ids. Shared by the
two-tower baseline and the AVG evaluation.
"""

from collections.abc import Sequence

import numpy as np


def recall_at_k(
  ranked_ids: np.ndarray, true_ids: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
  """Percent of queries whose true id is in the first k of their ranking.

  ranked_ids: `int[Q, K]` retrieved image ids per query, best first (K >= max(ks); an id may
    be any integer, e.g. -1 for "no result", which never matches a real image).
  true_ids: `int[Q]` the image each query describes.
  Returns `{"R@1": ..., "R@5": ..., ...}`, values in [0, 100] (as papers report them).
  """
  ranked_ids = np.asarray(ranked_ids)
  true_ids = np.asarray(true_ids)
  if ranked_ids.ndim != 2 or true_ids.shape != ranked_ids.shape[:1]:
    raise ValueError(
      f"expected ranked_ids [Q, K] and true_ids [Q], got {ranked_ids.shape} and {true_ids.shape}"
    )
  if ranked_ids.shape[0] == 0:
    raise ValueError("recall over zero queries is undefined")
  if max(ks) > ranked_ids.shape[1]:
    raise ValueError(f"R@{max(ks)} needs at least {max(ks)} ranked ids, got {ranked_ids.shape[1]}")
  hits = ranked_ids == true_ids[:, None]  # [Q, K]
  # Position of the first hit (K when missing); duplicates in a ranking count once.
  first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), ranked_ids.shape[1])
  return {f"R@{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}


def hits_at_k(ranked_ids: np.ndarray, true_ids: np.ndarray, k: int) -> np.ndarray:
  """`float64[Q]`: 1 where the true id is in the first k of the query's ranking, else 0."""
  return np.any(np.asarray(ranked_ids)[:, :k] == np.asarray(true_ids)[:, None], axis=1).astype(
    np.float64
  )


def paired_difference(
  hits_a: np.ndarray, hits_b: np.ndarray, *, bootstrap: int = 4000, seed: int = 0
) -> dict:
  """Mean of `hits_a - hits_b` over the same queries, in points, and its 95 % bootstrap
  interval over queries: `{"diff", "ci95": [lo, hi]}` (hits as from `hits_at_k`)."""
  diff = np.asarray(hits_a, np.float64) - np.asarray(hits_b, np.float64)
  if diff.ndim != 1 or not len(diff):
    raise ValueError(f"expected two equal-length [Q] hit vectors, got {diff.shape}")
  idx = np.random.default_rng(seed).integers(0, len(diff), (bootstrap, len(diff)))
  boot = diff[idx].mean(axis=1)
  return {
    "diff": float(100 * diff.mean()),
    "ci95": [float(100 * np.percentile(boot, 2.5)), float(100 * np.percentile(boot, 97.5))],
  }


def code_recall_at_k(
  sequences: np.ndarray, true_codes: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
  """The paper's code-level Recall@K: percent of queries for which one of the first K
  generated sequences carries the true image's semantic codes.

  sequences: `int[Q, K, P]` generated identifiers per query, best first (-1: none); only their
    first L positions (the semantic codes) are compared.
  true_codes: `int[Q, L]` the semantic codes of each query's image.
  Returns `{"code R@1": ..., ...}` in percent. Several images may share semantic codes, so
  this is never below image-level Recall@K of the same ranking of distinct code sequences.
  """
  sequences = np.asarray(sequences)
  true_codes = np.asarray(true_codes)
  if (
    sequences.ndim != 3
    or true_codes.ndim != 2
    or sequences.shape[0] != true_codes.shape[0]
    or sequences.shape[2] < true_codes.shape[1]
  ):
    raise ValueError(
      f"expected sequences [Q, K, P] and true_codes [Q, L <= P], got "
      f"{sequences.shape} and {true_codes.shape}"
    )
  if max(ks) > sequences.shape[1]:
    raise ValueError(
      f"code R@{max(ks)} needs at least {max(ks)} sequences, got {sequences.shape[1]}"
    )
  levels = true_codes.shape[1]
  hits = np.all(sequences[:, :, :levels] == true_codes[:, None, :], axis=-1)  # [Q, K]
  first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), sequences.shape[1])
  return {f"code R@{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}
