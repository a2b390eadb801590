"""The two-tower baseline: caption -> image cosine retrieval over one split's embeddings."""

import time

import numpy as np

from avg_jax.encoders import retrieval
from avg_jax.evaluation.recall import recall_at_k


def recall(embeddings: dict, ks, mesh, *, query_batch: int = 1024, chunk_size: int = 65536) -> dict:
  """Recall@K (percent) of caption -> image cosine retrieval over one split's embeddings,
  plus `queries_per_s` of the search and `_ranked_ids int64[Q, K]` (the ranking itself)."""
  ks = tuple(int(k) for k in ks)
  image_ids = np.asarray(embeddings["image_ids"])
  k = min(max(ks), len(image_ids))
  index = retrieval.BruteForceIndex(embeddings["image_emb"], mesh=mesh, chunk_size=chunk_size)
  queries = np.asarray(embeddings["caption_emb"], np.float32)
  batches = [queries[i : i + query_batch] for i in range(0, len(queries), query_batch)]
  for batch in {len(b): b for b in batches}.values():
    index.search(batch, k)  # compile every batch shape outside the timed region
  t0 = time.perf_counter()
  ranked = [index.search(batch, k)[1] for batch in batches]
  elapsed = time.perf_counter() - t0
  ranked_ids = image_ids[np.concatenate(ranked)]
  if k < max(ks):  # fewer images than the largest K: pad with "no result"
    ranked_ids = np.pad(ranked_ids, ((0, 0), (0, max(ks) - k)), constant_values=-1)
  metrics = recall_at_k(ranked_ids, embeddings["caption_image_ids"], ks)
  metrics["queries_per_s"] = len(queries) / max(elapsed, 1e-9)
  metrics["_ranked_ids"] = ranked_ids
  return metrics
