"""Hierarchical k-means identifiers ("semantic identifiers" of DSI / GRACE).

Fitting (on the training images' embeddings): level 0 clusters all points into K clusters;
at each next level every cluster of the previous level is clustered again into K clusters,
or, when it has at most K members, each member becomes its own child (code = its rank by
image id), as DSI does at the leaves. A prefix with no training member has no children.

Assigning any image (training or not): walk the tree, at each level taking the nearest child
centroid of the current prefix; below a prefix without children the code is 0. Collisions
left at the last level are resolved by disambiguation like any other scheme.

To bound recompilation, groups run k-means padded to the next power of two with zero weights.
"""

import dataclasses

import jax
import numpy as np

from avg_jax.tokenizer import kmeans as kmeans_lib


@dataclasses.dataclass
class HKMeansTree:
  """`children[level][prefix]` = `[k, D]` child centroids of `prefix` (a tuple of codes)."""

  codebook_size: int
  num_levels: int
  children: list[dict[tuple[int, ...], np.ndarray]]


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """`[n, D]`, `[k, D]` -> int64[n] index of the nearest centroid (first on ties)."""
  scores = np.sum(centroids * centroids, axis=1)[None, :] - 2.0 * x @ centroids.T
  return np.argmin(scores, axis=1)


def _cluster(key: jax.Array, x: np.ndarray, k: int, iters: int, init: str) -> np.ndarray:
  """k-means of `x [n, D]` (n > k) padded to a power of two: -> `[k, D]` centroids."""
  n = x.shape[0]
  padded = 1 << (n - 1).bit_length()
  xp = np.zeros((padded, x.shape[1]), np.float32)
  xp[:n] = x
  weights = np.zeros((padded,), np.float32)
  weights[:n] = 1.0
  result = kmeans_lib.kmeans(key, xp, k, iters=iters, init=init, weights=weights)
  return np.asarray(result.centroids)


def fit(
  key: jax.Array,
  x: np.ndarray,
  image_ids: np.ndarray,
  codebook_size: int,
  num_levels: int,
  *,
  iters: int,
  init: str = "kmeans++",
) -> HKMeansTree:
  """Builds the tree over `x [N, D]` (rows ordered arbitrarily; `image_ids [N]` break ties)."""
  x = np.asarray(x, np.float32)
  image_ids = np.asarray(image_ids, np.int64)
  children: list[dict] = []
  # prefix -> member rows, by image id
  groups: dict[tuple[int, ...], np.ndarray] = {(): np.argsort(image_ids, kind="stable")}
  for level in range(num_levels):
    level_children: dict[tuple[int, ...], np.ndarray] = {}
    next_groups: dict[tuple[int, ...], np.ndarray] = {}
    for prefix in sorted(groups):
      members = groups[prefix]
      if len(members) <= codebook_size:
        centroids = x[members]
      else:
        group_key = jax.random.fold_in(jax.random.fold_in(key, level), len(level_children))
        centroids = _cluster(group_key, x[members], codebook_size, iters, init)
      level_children[prefix] = centroids
      codes = _nearest(x[members], centroids)
      for code in np.unique(codes):
        next_groups[prefix + (int(code),)] = members[codes == code]
    children.append(level_children)
    groups = next_groups
  return HKMeansTree(codebook_size, num_levels, children)


def assign(tree: HKMeansTree, x: np.ndarray) -> np.ndarray:
  """`x [N, D]` -> int32[N, L] codes by walking `tree` (see module doc)."""
  x = np.asarray(x, np.float32)
  codes = np.zeros((x.shape[0], tree.num_levels), np.int32)
  groups: dict[tuple[int, ...], np.ndarray] = {(): np.arange(x.shape[0])}
  for level in range(tree.num_levels):
    next_groups: dict[tuple[int, ...], np.ndarray] = {}
    for prefix, rows in groups.items():
      centroids = tree.children[level].get(prefix)
      if centroids is None:
        continue  # no children: codes stay 0 from here on
      level_codes = _nearest(x[rows], centroids)
      codes[rows, level] = level_codes
      for code in np.unique(level_codes):
        next_groups[prefix + (int(code),)] = rows[level_codes == code]
    groups = next_groups
  return codes


def level_codebook(
  x: np.ndarray, codes: np.ndarray, codebook_size: int, fill: np.ndarray
) -> np.ndarray:
  """Per-level token vectors `[L * K, D]` (level-major) from training points `x [N, D]`.

  Row (l, c) is the mean over training points with code c at level l of their residual
  `x - mean(points sharing their first l codes)` (level 0: `x` itself), so the rows of a path
  add up to roughly the point, like residual-quantisation codewords. Rows no training point
  uses are taken from `fill [L * K, D]`.
  """
  x = np.asarray(x, np.float32)
  n, num_levels = codes.shape
  rows = np.array(fill, np.float32, copy=True)
  parent_mean = np.zeros_like(x)
  for level in range(num_levels):
    residual = x - parent_mean
    flat = level * codebook_size + codes[:, level]
    sums = np.zeros((num_levels * codebook_size, x.shape[1]), np.float64)
    np.add.at(sums, flat, residual)
    counts = np.bincount(flat, minlength=num_levels * codebook_size)
    used = counts > 0
    rows[used] = (sums[used] / counts[used, None]).astype(np.float32)
    # Mean of the points sharing each prefix of length level + 1.
    _, prefix_group = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
    prefix_group = prefix_group.reshape(-1)
    group_sums = np.zeros((prefix_group.max() + 1, x.shape[1]), np.float64)
    np.add.at(group_sums, prefix_group, x)
    group_counts = np.bincount(prefix_group)
    parent_mean = (group_sums / group_counts[:, None])[prefix_group].astype(np.float32)
  return rows
