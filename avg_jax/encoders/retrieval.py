"""Two-tower retrieval: exact (brute-force) cosine top-k over N item embeddings.

Items are L2-normalised once and stored on the mesh, split along the logical axis `items`
(the mesh's data axes). A search runs as one jitted program: each device scans its shard in
chunks of `chunk_size` rows, keeping a running top-k (memory `[Q, chunk_size]`, independent of
N), then the per-device candidates are all-gathered and merged.

Ties are broken deterministically: the lower item index comes first. `lax.top_k` is stable
(lower index first among equal values); running results precede the next chunk and device d
precedes device d + 1, so every merge sees candidates in index order.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avg_jax import partitioning
from avg_jax.encoders.contrastive import l2_normalize

_HOST_SLICE = 65536  # rows normalised at a time while placing items


def chunked_top_k(
  queries: jax.Array,
  items: jax.Array,
  k: int,
  chunk_size: int,
  *,
  first_index: jax.Array | int = 0,
  num_valid: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Top-k inner products of `queries [Q, D]` against `items [n, D]` (n a multiple of
  `chunk_size`, `chunk_size >= k`), scanning chunks. Rows whose global index
  (`first_index` + row) is >= `num_valid` are padding and never returned ahead of real rows.
  Returns `(scores float32[Q, k], indices int32[Q, k])` with global indices."""
  n, dim = items.shape
  num_chunks = n // chunk_size
  num_valid = n if num_valid is None else num_valid
  chunks = items.reshape(num_chunks, chunk_size, dim)
  q = queries.astype(jnp.float32)
  init = (
    jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
    jnp.full((q.shape[0], k), -1, jnp.int32),
  )

  def body(carry, xs):
    best_scores, best_ids = carry
    chunk, chunk_index = xs
    scores = jnp.einsum("qd,nd->qn", q, chunk.astype(jnp.float32))  # [Q, chunk]
    ids = first_index + chunk_index * chunk_size + jnp.arange(chunk_size, dtype=jnp.int32)
    scores = jnp.where(ids[None, :] < num_valid, scores, -jnp.inf)
    top_scores, top_pos = jax.lax.top_k(scores, k)  # [Q, k]
    merged_scores = jnp.concatenate([best_scores, top_scores], axis=1)  # earlier ids first
    merged_ids = jnp.concatenate([best_ids, ids[top_pos]], axis=1)
    keep_scores, keep_pos = jax.lax.top_k(merged_scores, k)
    return (keep_scores, jnp.take_along_axis(merged_ids, keep_pos, axis=1)), None

  (scores, ids), _ = jax.lax.scan(body, init, (chunks, jnp.arange(num_chunks, dtype=jnp.int32)))
  return scores, ids


class BruteForceIndex:
  """Exact cosine-similarity search over `items [N, D]` placed on `mesh`."""

  def __init__(
    self, items: Any, *, mesh: Mesh | None = None, chunk_size: int = 65536, dtype: Any = jnp.float32
  ):
    """items: `float[N, D]` numpy or jax array (normalised here, on the host in slices)."""
    self.num_items, self.dim = int(items.shape[0]), int(items.shape[1])
    if self.num_items == 0:
      raise ValueError("cannot index zero items")
    self.mesh = mesh if mesh is not None else partitioning.make_mesh({"data": 1}, jax.devices()[:1])
    spec = partitioning.logical_sharding(self.mesh, "items", None).spec
    axes = spec[0] if len(spec) else None
    self._axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    self.num_shards = math.prod(self.mesh.shape[a] for a in self._axes)
    per_shard = -(-self.num_items // self.num_shards)
    self.chunk_size = max(1, min(int(chunk_size), per_shard))
    self.rows_per_shard = -(-per_shard // self.chunk_size) * self.chunk_size
    self.dtype = dtype
    self._sharding = NamedSharding(self.mesh, PartitionSpec(self._axes or None, None))
    self.items = self._place(items)
    self._search_fns: dict[int, Any] = {}

  def _place(self, items: Any) -> jax.Array:
    total = self.rows_per_shard * self.num_shards
    np_dtype = np.dtype(self.dtype)

    def shard(index):
      rows = index[0]
      start, stop = rows.start or 0, rows.stop if rows.stop is not None else total
      out = np.zeros((stop - start, self.dim), np_dtype)  # padding rows stay zero
      # Normalise in slices: host memory stays at one copy of the shard.
      for lo in range(start, min(stop, self.num_items), _HOST_SLICE):
        hi = min(lo + _HOST_SLICE, stop, self.num_items)
        part = np.asarray(items[lo:hi], np.float32)
        norms = np.sqrt(np.maximum((part * part).sum(-1, keepdims=True), 1e-24))
        out[lo - start : hi - start] = (part / norms).astype(np_dtype)
      return out

    return jax.make_array_from_callback((total, self.dim), self._sharding, shard)

  def _search_fn(self, k: int):
    if k in self._search_fns:
      return self._search_fns[k]
    chunk = max(self.chunk_size, k)  # a chunk must hold k rows for the per-chunk top-k
    rows, axes, num_items = self.rows_per_shard, self._axes, self.num_items
    pad = -(-rows // chunk) * chunk - rows

    def local(queries, items):  # queries [Q, D] (replicated), items [rows, D] (this shard)
      shard_index = jax.lax.axis_index(axes) if axes else 0
      if pad:
        items = jnp.concatenate([items, jnp.zeros((pad, items.shape[1]), items.dtype)])
      # Padding rows are masked by index: indices >= rows belong to the next shard.
      first = shard_index * rows
      scores, ids = chunked_top_k(
        queries, items, k, chunk, first_index=first, num_valid=jnp.minimum(first + rows, num_items)
      )
      if axes:
        scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True)  # [Q, shards * k]
        ids = jax.lax.all_gather(ids, axes, axis=1, tiled=True)
        scores, pos = jax.lax.top_k(scores, k)
        ids = jnp.take_along_axis(ids, pos, axis=1)
      return scores, ids

    replicated = PartitionSpec()
    mapped = jax.shard_map(
      local,
      mesh=self.mesh,
      in_specs=(replicated, PartitionSpec(axes or None, None)),
      out_specs=(replicated, replicated),
      check_vma=False,
    )

    def search(queries, items):
      return mapped(l2_normalize(queries), items)

    fn = jax.jit(
      search,
      in_shardings=(NamedSharding(self.mesh, replicated), self._sharding),
      out_shardings=(NamedSharding(self.mesh, replicated),) * 2,
    )
    self._search_fns[k] = fn
    return fn

  def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`queries float[Q, D]` -> (cosine scores `float32[Q, k]`, item indices `int32[Q, k]`),
    best first, ties by lower index."""
    if not 1 <= k <= self.num_items:
      raise ValueError(f"k={k} must be in [1, {self.num_items}]")
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [Q, {self.dim}], got {queries.shape}")
    num_queries = queries.shape[0]
    # Pad the query count to a power of two: few distinct shapes, few compilations.
    padded = np.zeros((1 << max(num_queries - 1, 0).bit_length(), self.dim), np.float32)
    padded[:num_queries] = queries
    placed = jax.make_array_from_callback(
      padded.shape, NamedSharding(self.mesh, PartitionSpec()), lambda idx: padded[idx]
    )
    scores, ids = self._search_fn(int(k))(placed, self.items)
    return np.asarray(scores)[:num_queries], np.asarray(ids)[:num_queries]


def top_k_indices(
  queries: Any,
  items: Any,
  k: int,
  *,
  mesh: Mesh | None = None,
  chunk_size: int = 65536,
  query_batch: int = 1024,
) -> np.ndarray:
  """Convenience: indices `int32[Q, k]` of the k most cosine-similar items per query."""
  index = BruteForceIndex(items, mesh=mesh, chunk_size=chunk_size)
  queries = np.asarray(queries, np.float32)
  out = [
    index.search(queries[i : i + query_batch], k)[1]
    for i in range(0, queries.shape[0], query_batch)
  ]
  return np.concatenate(out, axis=0) if out else np.zeros((0, k), np.int32)
