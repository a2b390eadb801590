"""Queries/s of AVG and of two-tower brute force as the number of indexed images grows.

AVG: the trained generator searches a trie of the real test images plus random distractor
identifiers up to N (a step's cost depends on fan-out, not N). Two-tower: cosine top-k over
N random embeddings of the dual encoder's width. Both include encoding the query text (T5
encoder inside the AVG search; the dual encoder's text tower for two-tower, measured once and
added per query), so the numbers compare whole queries. When AVG orders images that share
codes by the dual encoder's similarity (`decode.tie_break="similarity"`), its queries need the
text tower too: that time is added to AVG's as well. Two-tower with an approximate index
(what users run at scale): a faiss HNSW graph over the same items, its queries/s, recall@k
against exact search, build time and bytes, for each candidate-list size `ef_search` (the
recall-vs-speed frontier).

Distractor embeddings (`distractor_embeddings`) are drawn from a Gaussian fitted to the real
test images' embeddings (mean and covariance), not an isotropic one: an ANN graph's recall
depends on how the data clusters, and isotropic noise in 128 dimensions is its hardest case.
"""

import time

import numpy as np

from avg_jax import partitioning
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import VokenTrie
from avg_jax.encoders import retrieval
from avg_jax.evaluation import ann, avg_eval
from avg_jax.progress import progress


def distractor_codes(
  real_codes: np.ndarray, position_sizes, n: int, seed: int = 0, *, distinct: bool = True
) -> np.ndarray:
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
    draw = draw[np.sort(first)]  # distinct, in draw order
    draw = draw[~np.isin(draw, taken) & ~np.isin(draw, keys)]
    keys = np.concatenate([keys, draw])
  keys = keys[:n]
  return np.stack([(keys // w) % s for w, s in zip(weights, sizes)], axis=1).astype(np.int32)


def distractor_embeddings(real_emb: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
  """`float32[n, D]` drawn from a Gaussian with the mean and covariance of `real_emb [M, D]`
  (regularised so that M < D still gives a proper covariance)."""
  real = np.asarray(real_emb, np.float64)
  mean = real.mean(axis=0)
  cov = np.cov(real, rowvar=False) if len(real) > 1 else np.zeros((real.shape[1],) * 2)
  cov += 1e-4 * max(float(np.trace(cov)) / len(mean), 1e-6) * np.eye(len(mean))
  chol = np.linalg.cholesky(cov)
  rng = np.random.default_rng(seed)
  out = np.empty((n, len(mean)), np.float32)
  for start in range(0, n, 65536):  # in slices: float64 noise for 1M x D would double memory
    z = rng.standard_normal((min(65536, n - start), len(mean)))
    out[start : start + len(z)] = (mean + z @ chol.T).astype(np.float32)
  return out


def index_items(real_emb: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
  """The N items of a timed two-tower index: the real test images first, then distractors."""
  real = np.asarray(real_emb, np.float32)[:n]
  return np.concatenate([real, distractor_embeddings(real_emb, max(n - len(real), 0), seed)])


def exact_top_k(items: np.ndarray, queries: np.ndarray, k: int, chunk: int = 262144) -> np.ndarray:
  """`int64[Q, k]` indices of each query's k most cosine-similar items (host, in chunks)."""
  q = ann.normalize(queries)
  best_s = np.full((len(q), 0), -np.inf, np.float32)
  best_i = np.zeros((len(q), 0), np.int64)
  for start in range(0, len(items), chunk):
    sims = q @ ann.normalize(items[start : start + chunk]).T
    s = np.concatenate([best_s, sims], axis=1)
    i = np.concatenate(
      [best_i, start + np.broadcast_to(np.arange(sims.shape[1]), sims.shape)], axis=1
    )
    keep = np.argsort(-s, axis=1, kind="stable")[:, :k]
    best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
  return best_i


def fastest_at_recall(rows: list[dict], target: float) -> list[dict]:
  """Per N, the HNSW row a user would deploy: the fastest whose recall reaches `target`, else
  the most accurate one."""
  out = []
  for n in sorted({r["num_items"] for r in rows}):
    at_n = [r for r in rows if r["num_items"] == n]
    good = [r for r in at_n if r["recall_at_k"] >= target]
    out.append(
      max(good, key=lambda r: r["queries_per_s"])
      if good
      else max(at_n, key=lambda r: r["recall_at_k"])
    )
  return out


def ann_queries_per_s(
  image_emb: np.ndarray,
  query_emb: np.ndarray,
  sizes,
  *,
  k: int,
  batch_size: int,
  m: int,
  ef_construction: int,
  ef_search,
  encode_s_per_query: float,
  seed: int = 0,
  repeats: int = 3,
) -> list[dict]:
  """Two-tower over a faiss HNSW index: for each N and each `ef_search`, `{"num_items",
  "ef_search", "queries_per_s" (with the text tower), "search_only_queries_per_s",
  "recall_at_k" (against exact search), "build_s", "index_bytes"}` (median of `repeats`)."""
  rows = []
  for n in progress(sizes, desc="efficiency (two-tower HNSW)", unit="N"):
    items = index_items(image_emb, int(n), seed)
    exact = exact_top_k(items, query_emb, k)
    index = ann.HnswIndex(items, m=m, ef_construction=ef_construction)
    nbytes = index.nbytes
    batches = [query_emb[i : i + batch_size] for i in range(0, len(query_emb), batch_size)]
    for ef in ef_search:
      found = np.concatenate([index.search(b, k, ef_search=ef)[1] for b in batches])
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        for b in batches:
          index.search(b, k, ef_search=ef)
        times.append((time.perf_counter() - t0) / len(query_emb))
      search_s = float(np.median(times))
      rows.append(
        {
          "num_items": int(n),
          "ef_search": int(ef),
          "queries_per_s": 1.0 / (encode_s_per_query + search_s),
          "search_only_queries_per_s": 1.0 / search_s,
          "recall_at_k": ann.recall_against_exact(found, exact),
          "k": int(k),
          "build_s": index.build_s,
          "index_bytes": nbytes,
        }
      )
    del index, items
  return rows


def text_encode_s_per_query(encoder, mesh, texts: list[str], batch_size: int) -> float:
  """Seconds per query of the dual encoder's text tower, in batches of `batch_size`."""
  batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
  encoder.encode_texts(batches[0], mesh)  # compile
  t0 = time.perf_counter()
  for b in batches:
    encoder.encode_texts(b, mesh)
  return (time.perf_counter() - t0) / len(texts)


def avg_queries_per_s(
  gen,
  params,
  param_shardings,
  mesh,
  config,
  inputs: np.ndarray,
  sizes,
  *,
  seed: int = 0,
  query_emb: np.ndarray | None = None,
  image_emb: np.ndarray | None = None,
  encode_s_per_query: float = 0.0,
  query_head=None,
) -> list[dict]:
  """`[{"num_items", "queries_per_s", "trie_bytes", "embedding_bytes", "trie_build_s"}]` for
  each N in `sizes`.

  With `image_emb [N_test, D]` the index carries image embeddings (distractors get some too)
  for the similarity tie-break or avg_hybrid; their query embeddings are `query_emb [Q, D]`
  from the text tower, whose time `encode_s_per_query` is then added, or come from the
  generator's `query_head` inside the timed search."""
  image_ids, codes = gen.codes("test")
  d = DecodeConfig.from_config(config.decode)
  sizes_p = gen.vocab.position_sizes()[: gen.trained_length]
  search_fn = avg_eval.make_eval_search_fn(gen, mesh, param_shardings, d, query_head=query_head)
  use_emb = image_emb is not None and (query_emb is not None or query_head is not None)
  tower = use_emb and query_emb is not None
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
      assert image_emb is not None  # use_emb requires it
      fake_emb = distractor_embeddings(image_emb, extra, seed)
      item_embeddings = (ids, np.concatenate([image_emb, fake_emb]))
    device_trie = trie.to_device(
      dense_levels=d.dense_levels,
      sharding=partitioning.replicated(mesh),
      item_embeddings=item_embeddings,
    )
    _, (seconds, timed) = avg_eval.run_search(
      search_fn,
      params,
      device_trie,
      inputs,
      mesh=mesh,
      batch_size=d.batch_size,
      desc=f"N={n}",
      query_emb=query_emb if tower else None,
    )
    per_query = seconds / max(timed, 1) + (encode_s_per_query if tower else 0.0)
    rows.append(
      {
        "num_items": int(n),
        "queries_per_s": 1.0 / max(per_query, 1e-12),
        "trie_bytes": int(device_trie.nbytes),
        "embedding_bytes": int(device_trie.embedding_nbytes),
        "trie_build_s": build_s,
      }
    )
  return rows


def two_tower_queries_per_s(
  encoder,
  mesh,
  texts: list[str],
  query_emb: np.ndarray,
  sizes,
  *,
  k: int,
  batch_size: int,
  seed: int = 0,
  encode_s_per_query: float | None = None,
) -> list[dict]:
  """Brute-force cosine top-k over N random embeddings, plus the text tower's time."""
  if encode_s_per_query is None:
    encode_s_per_query = text_encode_s_per_query(encoder, mesh, texts, batch_size)
  rng = np.random.default_rng(seed)
  rows = []
  for n in progress(sizes, desc="efficiency (two-tower)", unit="N"):
    items = rng.standard_normal((int(n), query_emb.shape[1]), dtype=np.float32)
    index = retrieval.BruteForceIndex(items, mesh=mesh)
    qb = [query_emb[i : i + batch_size] for i in range(0, len(query_emb), batch_size)]
    index.search(qb[0], k)  # compile
    t0 = time.perf_counter()
    for q in qb:
      index.search(q, k)
    search_s_per_query = (time.perf_counter() - t0) / len(query_emb)
    rows.append(
      {
        "num_items": int(n),
        "queries_per_s": 1.0 / (encode_s_per_query + search_s_per_query),
        "search_only_queries_per_s": 1.0 / search_s_per_query,
      }
    )
    del index, items
  return rows
