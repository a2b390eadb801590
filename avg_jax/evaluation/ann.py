"""Approximate nearest-neighbour search for the two-tower baseline: what users actually run.

A two-tower system does not brute-force a million embeddings; it builds an ANN index. We use
faiss's HNSW graph (`IndexHNSWFlat`, inner product over L2-normalised embeddings = cosine):
faiss is Meta's maintained similarity-search library with CPU wheels on PyPI (no GPU, no
TensorFlow), and HNSW is the standard in-memory index at this scale (best recall per query
time among faiss's CPU indexes for < 10M vectors; its cost is build time and memory).

    index = HnswIndex(items [N, D], m=16, ef_construction=64)
    scores, ids = index.search(queries [Q, D], k=10, ef_search=64)
    index.build_s, index.nbytes

faiss parallelises with OpenMP: its threads are set to this process's CPU affinity and, unless
the user set it, `OMP_WAIT_POLICY=PASSIVE` before faiss loads (busy-waiting threads steal the
CPU from everything else on a small machine).
"""

import logging
import os
import time

import numpy as np


def _faiss():
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when OpenMP starts
  # faiss's loader tries its AVX512 / AVX2 builds before the generic one and logs each miss at
  # INFO through python logging (`Could not load library with AVX2 support due to:
  # ModuleNotFoundError(...)`), which the CLI's INFO handler prints as if it were an error.
  # A wheel with one build always misses: only the loader's INFO lines are muted, unless the
  # user configured that logger; a faiss that cannot load at all still raises ImportError.
  loader = logging.getLogger("faiss.loader")
  if loader.level == logging.NOTSET:
    loader.setLevel(logging.WARNING)
  import faiss  # pylint: disable=import-outside-toplevel

  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  faiss.omp_set_num_threads(max(1, threads or 1))
  return faiss


def normalize(x: np.ndarray) -> np.ndarray:
  """`float32[N, D]` rows scaled to unit length (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class HnswIndex:
  """Cosine top-k over `items [N, D]` with a faiss HNSW graph."""

  def __init__(self, items: np.ndarray, *, m: int = 16, ef_construction: int = 64):
    faiss = _faiss()
    items = normalize(items)
    if items.ndim != 2 or not len(items):
      raise ValueError(f"expected items [N, D] with N > 0, got {items.shape}")
    self.num_items, self.dim = items.shape
    start = time.perf_counter()
    self._index = faiss.IndexHNSWFlat(self.dim, int(m), faiss.METRIC_INNER_PRODUCT)
    self._index.hnsw.efConstruction = int(ef_construction)
    self._index.add(items)
    self.build_s = time.perf_counter() - start
    self.m, self.ef_construction = int(m), int(ef_construction)

  @property
  def nbytes(self) -> int:
    """Bytes of the serialised index (vectors + graph)."""
    return int(len(_faiss().serialize_index(self._index)))

  def search(
    self, queries: np.ndarray, k: int, *, ef_search: int = 64
  ) -> tuple[np.ndarray, np.ndarray]:
    """`queries [Q, D]` -> (cosine `float32[Q, k]`, item indices `int64[Q, k]`; -1 missing).

    `ef_search` (>= k) is the candidate list size: higher finds more true neighbours, slower.
    """
    if not 1 <= k <= self.num_items:
      raise ValueError(f"k={k} must be in [1, {self.num_items}]")
    self._index.hnsw.efSearch = max(int(ef_search), int(k))
    scores, ids = self._index.search(normalize(queries), int(k))
    return scores, ids


def recall_against_exact(found: np.ndarray, exact: np.ndarray) -> float:
  """Mean share of each query's exact top-k (`exact [Q, k]`) found in `found [Q, k]`."""
  found, exact = np.asarray(found), np.asarray(exact)
  if found.shape != exact.shape:
    raise ValueError(f"found {found.shape} and exact {exact.shape} differ")
  hits = [len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)]
  return float(np.sum(hits) / exact.size)
