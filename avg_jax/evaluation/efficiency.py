"""Queries/s of AVG and of two-tower brute force as the number of indexed images grows.

AVG: the trained generator searches a trie of the real test images plus random distractor
identifiers up to N (a step's cost depends on fan-out, not N). Two-tower: cosine top-k over
N random embeddings of the dual encoder's width. Both include encoding the query text (T5
encoder inside the AVG search; the dual encoder's text tower for two-tower, measured once and
added per query), so the numbers compare whole queries. When AVG orders images that share
codes by the dual encoder's similarity (`decode.tie_break="similarity"`), its queries need the
text tower too: that time is added to AVG's as well, and distractors get random embeddings.
"""

import time

import numpy as np

from avg_jax import partitioning
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.trie import VokenTrie
from avg_jax.encoders import retrieval
from avg_jax.evaluation import avg_eval
from avg_jax.progress import progress


def distractor_codes(real_codes: np.ndarray, position_sizes, n: int, seed: int = 0, *,
                     distinct: bool = True) -> np.ndarray:
  """`n` random identifiers `int32[n, P]`.

  `distinct`: distinct from each other and from `real_codes` (full identifiers); raises
  `ValueError` when the identifier space cannot hold them comfortably. Otherwise codes may
  repeat (semantic codes: a large index has groups of images that share them).
  """
  sizes = np.asarray(position_sizes, np.int64)
  space = float(np.prod(sizes.astype(np.float64)))
  rng = np.random.default_rng(seed)
  if not distinct:
    return np.stack([rng.integers(0, s, n) for s in sizes], axis=1).astype(np.int32)
  if n + len(real_codes) > 0.9 * space:
    raise ValueError(f"{n} distractors do not fit an identifier space of {space:.0f}")
  weights = np.cumprod(np.concatenate([[1], sizes[::-1][:-1]]))[::-1]  # mixed-radix key
  taken = np.unique(real_codes.astype(np.int64) @ weights)
  keys = np.zeros((0,), np.int64)
  while len(keys) < n:
    draw = rng.integers(0, int(space), size=int((n - len(keys)) * 1.2) + 16, dtype=np.int64)
    _, first = np.unique(draw, return_index=True)
    draw = draw[np.sort(first)]                                   # distinct, in draw order
    draw = draw[~np.isin(draw, taken) & ~np.isin(draw, keys)]
    keys = np.concatenate([keys, draw])
  keys = keys[:n]
  return np.stack([(keys // w) % s for w, s in zip(weights, sizes)], axis=1).astype(np.int32)


def text_encode_s_per_query(encoder, mesh, texts: list[str], batch_size: int) -> float:
  """Seconds per query of the dual encoder's text tower, in batches of `batch_size`."""
  batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
  encoder.encode_texts(batches[0], mesh)  # compile
  t0 = time.perf_counter()
  for b in batches:
    encoder.encode_texts(b, mesh)
  return (time.perf_counter() - t0) / len(texts)


def avg_queries_per_s(gen, params, param_shardings, mesh, config, inputs: np.ndarray,
                      sizes, *, seed: int = 0, query_emb: np.ndarray | None = None,
                      image_emb: np.ndarray | None = None,
                      encode_s_per_query: float = 0.0) -> list[dict]:
  """`[{"num_items", "queries_per_s", "trie_bytes", "embedding_bytes", "trie_build_s"}]` for
  each N in `sizes`.

  With `query_emb [Q, D]` and `image_emb [N_test, D]` (the similarity tie-break), the search
  orders shared codes by similarity and `encode_s_per_query` (the text tower) is added."""
  image_ids, codes = gen.codes("test")
  d = avg_eval.eval_decode(config).with_k(int(config.decode.top_k))
  sizes_p = gen.vocab.position_sizes()[:gen.trained_length]
  search_fn = search_lib.make_search_fn(gen.cfg, gen.vocab, mesh, param_shardings, d,
                                        trained_length=gen.trained_length)
  use_emb = query_emb is not None and image_emb is not None
  rng = np.random.default_rng(seed)
  rows = []
  for n in progress(sizes, desc="efficiency (AVG)", unit="N"):
    extra = max(int(n) - len(codes), 0)
    try:
      # Semantic codes repeat in a large index (groups); full identifiers never do.
      fake = distractor_codes(codes, sizes_p, extra, seed, distinct=gen.decode.learned_suffix)
    except ValueError as e:
      rows.append({"num_items": int(n), "skipped": str(e)})
      continue
    all_codes = np.concatenate([codes, fake])
    ids = np.concatenate([image_ids, image_ids.max() + 1 + np.arange(extra)])
    t0 = time.perf_counter()
    trie = VokenTrie.build(all_codes, ids, position_sizes=sizes_p)
    build_s = time.perf_counter() - t0
    item_embeddings = None
    if use_emb:
      fake_emb = rng.standard_normal((extra, image_emb.shape[1]), dtype=np.float32)
      item_embeddings = (ids, np.concatenate([image_emb, fake_emb]))
    device_trie = trie.to_device(dense_levels=d.dense_levels,
                                 sharding=partitioning.replicated(mesh),
                                 item_embeddings=item_embeddings)
    _, (seconds, timed) = avg_eval.run_search(search_fn, params, device_trie, inputs, mesh=mesh,
                                              batch_size=d.batch_size, desc=f"N={n}",
                                              query_emb=query_emb if use_emb else None)
    per_query = seconds / max(timed, 1) + (encode_s_per_query if use_emb else 0.0)
    rows.append({"num_items": int(n), "queries_per_s": 1.0 / max(per_query, 1e-12),
                 "trie_bytes": int(device_trie.nbytes),
                 "embedding_bytes": int(device_trie.embedding_nbytes), "trie_build_s": build_s})
  return rows


def two_tower_queries_per_s(encoder, mesh, texts: list[str], query_emb: np.ndarray, sizes, *,
                            k: int, batch_size: int, seed: int = 0,
                            encode_s_per_query: float | None = None) -> list[dict]:
  """Brute-force cosine top-k over N random embeddings, plus the text tower's time."""
  if encode_s_per_query is None:
    encode_s_per_query = text_encode_s_per_query(encoder, mesh, texts, batch_size)
  rng = np.random.default_rng(seed)
  rows = []
  for n in progress(sizes, desc="efficiency (two-tower)", unit="N"):
    items = rng.standard_normal((int(n), query_emb.shape[1]), dtype=np.float32)
    index = retrieval.BruteForceIndex(items, mesh=mesh)
    qb = [query_emb[i:i + batch_size] for i in range(0, len(query_emb), batch_size)]
    index.search(qb[0], k)  # compile
    t0 = time.perf_counter()
    for q in qb:
      index.search(q, k)
    search_s_per_query = (time.perf_counter() - t0) / len(query_emb)
    rows.append({"num_items": int(n),
                 "queries_per_s": 1.0 / (encode_s_per_query + search_s_per_query),
                 "search_only_queries_per_s": 1.0 / search_s_per_query})
    del index, items
  return rows
