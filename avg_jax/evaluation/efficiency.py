"""Queries/s of AVG and of two-tower brute force as the number of indexed images grows.

AVG: the trained generator searches a trie of the real test images plus random distractor
identifiers up to N (a step's cost depends on fan-out, not N). Two-tower: cosine top-k over
N random embeddings of the dual encoder's width. Both include encoding the query text (T5
encoder inside the AVG search; the dual encoder's text tower for two-tower, measured once and
added per query), so the numbers compare whole queries.
"""

import time

import numpy as np

from avg_jax import partitioning
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.trie import VokenTrie
from avg_jax.encoders import retrieval
from avg_jax.evaluation import avg_eval
from avg_jax.progress import progress


def distractor_codes(real_codes: np.ndarray, position_sizes, n: int,
                     seed: int = 0) -> np.ndarray:
  """`n` random identifiers `int32[n, P]`, distinct from each other and from `real_codes`.

  Raises `ValueError` when the identifier space cannot hold them comfortably.
  """
  sizes = np.asarray(position_sizes, np.int64)
  space = float(np.prod(sizes.astype(np.float64)))
  if n + len(real_codes) > 0.9 * space:
    raise ValueError(f"{n} distractors do not fit an identifier space of {space:.0f}")
  rng = np.random.default_rng(seed)
  weights = np.cumprod(np.concatenate([[1], sizes[::-1][:-1]]))[::-1]  # mixed-radix key
  taken = set((real_codes.astype(np.int64) @ weights).tolist())
  out = np.empty((0, len(sizes)), np.int64)
  while len(out) < n:
    draw = rng.integers(0, sizes, size=(int((n - len(out)) * 1.2) + 16, len(sizes)))
    keys = draw @ weights
    _, first = np.unique(keys, return_index=True)
    draw, keys = draw[np.sort(first)], keys[np.sort(first)]
    fresh = np.fromiter((k not in taken for k in keys.tolist()), bool, len(keys))
    draw, keys = draw[fresh], keys[fresh]
    taken.update(keys.tolist())
    out = np.concatenate([out, draw])
  return out[:n].astype(np.int32)


def avg_queries_per_s(gen, params, param_shardings, mesh, config, inputs: np.ndarray,
                      sizes, *, seed: int = 0) -> list[dict]:
  """`[{"num_items", "queries_per_s", "trie_bytes", "trie_build_s"}]` for each N in `sizes`."""
  image_ids, codes = gen.table["test"]
  k = int(config.decode.top_k)
  beam = max(int(config.decode.beam_size), k)
  search_fn = search_lib.make_search_fn(gen.cfg, gen.vocab, mesh, param_shardings,
                                        beam_size=beam, top_k=k,
                                        mask_mode=config.decode.mask_mode,
                                        voken_logits_only=bool(config.decode.voken_logits_only))
  rows = []
  for n in progress(sizes, desc="efficiency (AVG)", unit="N"):
    extra = max(int(n) - len(codes), 0)
    try:
      fake = distractor_codes(codes, gen.vocab.position_sizes(), extra, seed)
    except ValueError as e:
      rows.append({"num_items": int(n), "skipped": str(e)})
      continue
    all_codes = np.concatenate([codes, fake])
    ids = np.concatenate([image_ids, image_ids.max() + 1 + np.arange(extra)])
    t0 = time.perf_counter()
    trie = VokenTrie.build(all_codes, ids, position_sizes=gen.vocab.position_sizes())
    build_s = time.perf_counter() - t0
    device_trie = trie.to_device(dense_levels=int(config.decode.dense_levels),
                                 sharding=partitioning.replicated(mesh))
    _, (seconds, timed) = avg_eval.run_search(search_fn, params, device_trie, inputs, mesh=mesh,
                                              batch_size=int(config.decode.batch_size),
                                              desc=f"N={n}")
    rows.append({"num_items": int(n), "queries_per_s": timed / max(seconds, 1e-9),
                 "trie_bytes": int(device_trie.nbytes), "trie_build_s": build_s})
  return rows


def two_tower_queries_per_s(encoder, mesh, texts: list[str], query_emb: np.ndarray, sizes, *,
                            k: int, batch_size: int, seed: int = 0) -> list[dict]:
  """Brute-force cosine top-k over N random embeddings, plus the text tower's time."""
  batches = [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)]
  encoder.encode_texts(batches[0], mesh)  # compile
  t0 = time.perf_counter()
  for b in batches:
    encoder.encode_texts(b, mesh)
  encode_s_per_query = (time.perf_counter() - t0) / len(texts)
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
