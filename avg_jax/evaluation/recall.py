"""Recall@K for text-to-image retrieval (Karpathy protocol).

Every caption of a test image is one query; the query's hit is that image. Recall@K is the
percentage of queries whose image appears among the first K retrieved ids. Shared by the
two-tower baseline and the AVG evaluation.
"""

from typing import Sequence

import numpy as np


def recall_at_k(ranked_ids: np.ndarray, true_ids: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Percent of queries whose true id is in the first k of their ranking.

  ranked_ids: `int[Q, K]` retrieved image ids per query, best first (K >= max(ks); an id may
    be any integer, e.g. -1 for "no result", which never matches a real image).
  true_ids: `int[Q]` the image each query describes.
  Returns `{"R@1": ..., "R@5": ..., ...}`, values in [0, 100] (as papers report them).
  """
  ranked_ids = np.asarray(ranked_ids)
  true_ids = np.asarray(true_ids)
  if ranked_ids.ndim != 2 or true_ids.shape != ranked_ids.shape[:1]:
    raise ValueError(f"expected ranked_ids [Q, K] and true_ids [Q], got {ranked_ids.shape} "
                     f"and {true_ids.shape}")
  if ranked_ids.shape[0] == 0:
    raise ValueError("recall over zero queries is undefined")
  if max(ks) > ranked_ids.shape[1]:
    raise ValueError(f"R@{max(ks)} needs at least {max(ks)} ranked ids, got {ranked_ids.shape[1]}")
  hits = ranked_ids == true_ids[:, None]  # [Q, K]
  # Position of the first hit (K when missing); duplicates in a ranking count once.
  first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), ranked_ids.shape[1])
  return {f"R@{k}": float(100.0 * np.mean(first_hit < k)) for k in ks}
