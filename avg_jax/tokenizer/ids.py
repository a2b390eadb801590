"""Image identifiers: collision statistics, disambiguation, and the arbitrary-id baselines.

Identifier schemes other than the learned ones (avg / rq, see `stage.py`; hkmeans, see
`hkmeans.py`) are defined here precisely:

* `atomic`: images of all splits sorted by image id; image number i (0-based) gets i written in
  base K over L positions, most significant digit first (e.g. K=10, L=3: image 42 -> 0 4 2).
  Unique by construction; needs K^L >= number of images.
* `random`: every code uniformly random in [0, K), drawn by a seeded numpy generator with the
  images sorted by id (same images + seed -> same codes). Collisions are possible and are
  resolved by disambiguation like any other scheme.

Disambiguation appends one position: within a group of images sharing the same L codes,
ordered by image id, the i-th image gets index i; D is the largest group size. It is computed
within one *index* (a set of images searched together: the training split, the evaluated
split, an export's images), never across indexes: an identifier must not depend on images that
are not searched with it (`disambiguate_per_index`).
"""

import numpy as np

from avg_jax.errors import UserError


def collision_groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`codes [N, L]` -> (group int64[N], sizes int64[G]); rows with equal codes share a group."""
  codes = np.asarray(codes)
  if codes.shape[0] == 0:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
  _, group, sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
  return group.reshape(-1).astype(np.int64), sizes.astype(np.int64)


def collision_rate(codes: np.ndarray) -> float:
  """Share of rows of `codes [N, L]` whose code sequence also belongs to another row."""
  codes = np.asarray(codes)
  if codes.shape[0] == 0:
    return 0.0
  group, sizes = collision_groups(codes)
  return float(np.mean(sizes[group] > 1))


def disambiguate(codes: np.ndarray, image_ids: np.ndarray) -> tuple[np.ndarray, int]:
  """Makes identifiers unique: `codes [N, L]`, `image_ids [N]` -> (`[N, L + 1]`, D).

  The extra code is the image's rank by id within its collision group (stable: it depends
  only on the codes and ids, not on row order). D = the largest group size. Without any
  collision the codes are returned unchanged and D = 0 (no extra position).
  """
  codes = np.asarray(codes)
  image_ids = np.asarray(image_ids, np.int64)
  if len(np.unique(image_ids)) != len(image_ids):
    raise UserError("image ids must be unique across all splits to make identifiers unique")
  group, sizes = collision_groups(codes)
  largest = int(sizes.max()) if len(sizes) else 0
  if largest <= 1:
    return codes.astype(np.int32), 0
  order = np.lexsort((image_ids, group))  # by group, then by image id
  rank = np.empty(len(codes), np.int64)
  sorted_groups = group[order]
  starts = np.searchsorted(sorted_groups, sorted_groups, side="left")
  rank[order] = np.arange(len(codes)) - starts
  return np.concatenate([codes, rank[:, None]], axis=1).astype(np.int32), largest


def disambiguate_per_index(codes: dict, image_ids: dict) -> tuple[dict, int]:
  """Per-index identifiers: `{index: codes [N_i, L]}`, `{index: ids [N_i]}` ->
  (`{index: [N_i, L + 1]}`, D), or the codes unchanged and D = 0 when no image of any index
  shares its codes with another one.

  Each index is disambiguated on its own (`disambiguate`). D is the largest collision group
  over all images of all indexes together, so that a union of indexes (e.g. an export of two
  splits) can be disambiguated again (`disambiguate`) within the same D tokens.
  """
  every = np.concatenate([np.asarray(codes[k]) for k in codes])
  all_ids = np.concatenate([np.asarray(image_ids[k], np.int64) for k in codes])
  if len(np.unique(all_ids)) != len(all_ids):
    raise UserError("image ids must be unique across the indexes")
  _, sizes = collision_groups(every)
  largest = int(sizes.max()) if len(sizes) else 0
  if largest <= 1:
    return {k: np.asarray(v).astype(np.int32) for k, v in codes.items()}, 0
  out = {}
  for k, c in codes.items():
    c = np.asarray(c)
    _, group_sizes = collision_groups(c)
    if len(group_sizes) and group_sizes.max() > 1:
      out[k] = disambiguate(c, image_ids[k])[0]
    else:  # no collision in this index: every image is the first of its group
      out[k] = np.concatenate([c, np.zeros((len(c), 1), c.dtype)], axis=1).astype(np.int32)
  return out, largest


def atomic_codes(image_ids: np.ndarray, codebook_size: int, num_levels: int) -> np.ndarray:
  """`image_ids [N]` -> int32[N, L]: the rank of each id written in base K (see module doc)."""
  image_ids = np.asarray(image_ids, np.int64)
  n = len(image_ids)
  if n > codebook_size**num_levels:
    raise UserError(
      f"scheme 'atomic' needs tokenizer.codebook_size ** num_levels >= {n} images, "
      f"got {codebook_size}**{num_levels} = {codebook_size**num_levels}"
    )
  rank = np.empty(n, np.int64)
  rank[np.argsort(image_ids, kind="stable")] = np.arange(n)
  digits = [
    (rank // codebook_size ** (num_levels - 1 - p)) % codebook_size for p in range(num_levels)
  ]
  return np.stack(digits, axis=1).astype(np.int32)


def random_codes(
  image_ids: np.ndarray, codebook_size: int, num_levels: int, seed: int
) -> np.ndarray:
  """`image_ids [N]` -> int32[N, L] uniform codes, stable for the same ids and seed."""
  image_ids = np.asarray(image_ids, np.int64)
  order = np.argsort(image_ids, kind="stable")
  draws = np.random.default_rng(seed).integers(0, codebook_size, size=(len(image_ids), num_levels))
  codes = np.empty_like(draws)
  codes[order] = draws
  return codes.astype(np.int32)


def check_identifiers(
  codes: np.ndarray,
  position_sizes: tuple[int, ...],
  *,
  unique: bool = True,
  what: str = "identifiers",
) -> None:
  """Raises `ValueError` unless `codes [N, P]` has P positions, codes in range, unique rows."""
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[1] != len(position_sizes):
    raise ValueError(f"{what}: expected shape [N, {len(position_sizes)}], got {codes.shape}")
  if codes.size and ((codes < 0).any() or (codes >= np.asarray(position_sizes)[None]).any()):
    raise ValueError(f"{what}: codes outside {position_sizes}")
  if unique and len(np.unique(codes, axis=0)) != len(codes):
    raise ValueError(f"{what}: {len(codes) - len(np.unique(codes, axis=0))} duplicate rows")
