"""Prefix tree over the indexed images' voken identifiers, on the host and on the device.

Nodes live in levels: level 0 is the root, level l holds the distinct length-l prefixes of the
indexed identifiers `codes [N, P]`, level P the distinct full identifiers (the leaves). Within a
level, nodes are numbered in lexicographic order of their prefixes, so the children of one node
are contiguous in the next level and sorted by code. That gives a CSR form per level:

    offsets[l]  int32[n_l + 1]   children of node i at level l are nodes offsets[l][i] ..
                                 offsets[l][i+1]-1 of level l+1
    codes[l]    int32[n_{l+1}]   the code that leads to each node of level l+1

The child reached by code c is the *position* of c in the node's slice: no separate child
array. Leaves map back to item ids through `leaf_item_offsets`/`leaf_items` (several images
may share an identifier when the voken table has collisions; the smallest id represents the
leaf on the device).

On the device (`DeviceTrie`) the top `dense_levels` levels become dense `[n_l, K_l]` tables of
child indices (-1: no child), the rest stay CSR. One search step then asks `children(level,
node)` for a fixed-width window of candidate codes per beam: a dense row, or the node's
contiguous CSR slice padded to the level's largest fan-out (a gather and a mask; no binary
search is needed because beams always sit on existing nodes). The width never exceeds the
codebook size, so a step's cost does not grow with the number of indexed images.

Bad input: an empty code array, codes outside `[0, position_sizes[p])`, ragged or non-integer
sequences, duplicate item ids, or item ids outside int32 all raise `UserError`.
"""

import dataclasses
import os
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.artifacts import io
from avg_jax.errors import UserError

FORMAT_VERSION = 1
_INT32_MAX = np.iinfo(np.int32).max
# The smallest capacity a padded tree gets (`capacity_bucket`).
MIN_CAPACITY = 16


def _next_power_of_two(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def capacity_bucket(num_items: int) -> int:
  """The capacity `VokenTrie.to_device` pads a tree of `num_items` items to: the next power of
  two (at least `MIN_CAPACITY`), so a tree that grows by one item keeps its shapes until it
  doubles."""
  return max(MIN_CAPACITY, _next_power_of_two(num_items))


def _as_code_array(codes, position_sizes: Sequence[int] | None) -> np.ndarray:
  """Validates `codes [N, P]` (ragged lists and non-integers are errors) -> int64 array."""
  try:
    arr = np.asarray(codes)
  except ValueError as e:  # numpy refuses ragged nested lists
    raise UserError(f"voken trie: sequences must all have the same length ({e})") from e
  if arr.dtype == object:
    raise UserError("voken trie: sequences must all have the same length")
  if arr.ndim != 2:
    raise UserError(f"voken trie: expected codes of shape [N, P], got shape {list(arr.shape)}")
  if arr.shape[0] == 0:
    raise UserError("voken trie: cannot build a trie from 0 sequences (nothing is indexed)")
  if arr.shape[1] == 0:
    raise UserError("voken trie: sequences have length 0")
  if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
    raise UserError(f"voken trie: codes must be integers, got {arr.dtype}")
  arr = arr.astype(np.int64)
  if position_sizes is None:
    raise UserError("voken trie: position_sizes is required")
  sizes = np.asarray(position_sizes, np.int64)
  if sizes.shape != (arr.shape[1],):
    raise UserError(
      f"voken trie: position_sizes has {sizes.size} entries, sequences have length {arr.shape[1]}"
    )
  if (sizes <= 0).any():
    raise UserError(f"voken trie: position_sizes must be positive, got {sizes.tolist()}")
  bad = (arr < 0) | (arr >= sizes[None, :])
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise UserError(
      f"voken trie: code {int(arr[row, col])} at row {row}, position {col} is "
      f"outside [0, {int(sizes[col])})"
    )
  return arr


def _lexsort_rows(codes: np.ndarray, sizes: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
  """Permutation sorting rows by (codes lexicographically, item id)."""
  # One packed int64 key sorts much faster than a P-key lexsort when the id space fits.
  if float(np.prod(sizes.astype(np.float64))) < 2.0**62:
    key = np.zeros(codes.shape[0], np.int64)
    for p in range(codes.shape[1]):
      key = key * sizes[p] + codes[:, p]
    return np.lexsort((item_ids, key))
  return np.lexsort((item_ids,) + tuple(codes[:, p] for p in reversed(range(codes.shape[1]))))


@dataclasses.dataclass(frozen=True)
class VokenTrie:
  """Host-side (numpy) prefix tree in per-level CSR form; see the module docstring."""

  position_sizes: tuple[int, ...]
  offsets: tuple[np.ndarray, ...]  # P arrays, level l: int32[n_l + 1]
  codes: tuple[np.ndarray, ...]  # P arrays, level l: int32[n_{l+1}]
  leaf_item_offsets: np.ndarray  # int32[num_leaves + 1]
  leaf_items: np.ndarray  # int64[num_items], ascending within each leaf

  # --- construction ---------------------------------------------------------------------------
  @classmethod
  def build(cls, codes, item_ids=None, position_sizes: Sequence[int] | None = None) -> "VokenTrie":
    """Builds the trie from `codes int[N, P]` and `item_ids int[N]` (default `arange(N)`).

    Vectorised: one sort plus O(N * P) array operations, no per-sequence Python loop.
    """
    arr = _as_code_array(codes, position_sizes)
    n, p = arr.shape
    sizes = np.asarray(position_sizes, np.int64)
    if item_ids is None:
      ids = np.arange(n, dtype=np.int64)
    else:
      ids = np.asarray(item_ids)
      if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(
          f"voken trie: expected {n} integer item ids, got shape {list(ids.shape)} of {ids.dtype}"
        )
      ids = ids.astype(np.int64)
      # The device maps leaves to int32 item ids (jax runs without x64).
      if (ids < 0).any() or (ids > _INT32_MAX).any():
        raise UserError(f"voken trie: item ids must lie in [0, {_INT32_MAX}]")
      by_id = np.sort(ids)
      dup = by_id[1:][by_id[1:] == by_id[:-1]]
      if dup.size:
        raise UserError(f"voken trie: item id {int(dup[0])} appears more than once")
    order = _lexsort_rows(arr, sizes, ids)
    sorted_codes = arr[order]
    sorted_ids = ids[order]

    # new[i]: row i starts a new node at the current level (its prefix differs from row i-1).
    new = np.zeros(n, bool)
    new[0] = True
    offsets: list[np.ndarray] = []
    level_codes: list[np.ndarray] = []
    parent_of_row = np.zeros(n, np.int64)  # node index at the current level, per row
    for level in range(p):  # P is tiny (4-5): the loop is over levels, not sequences
      column = sorted_codes[:, level]
      new[1:] |= column[1:] != column[:-1]  # a new prefix stays new at deeper levels
      starts = np.flatnonzero(new)  # first row of each level+1 node
      child_parent = parent_of_row[starts]  # [n_{l+1}] parent node at level l
      num_parents = 1 if level == 0 else level_codes[-1].shape[0]
      counts = np.bincount(child_parent, minlength=num_parents)
      offsets.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
      level_codes.append(column[starts].astype(np.int32))
      parent_of_row = np.cumsum(new) - 1
    leaf_starts = np.flatnonzero(new)
    leaf_item_offsets = np.concatenate([leaf_starts, [n]]).astype(np.int32)
    return cls(
      tuple(int(s) for s in sizes),
      tuple(offsets),
      tuple(level_codes),
      leaf_item_offsets,
      sorted_ids,
    )

  # --- sizes ----------------------------------------------------------------------------------
  @property
  def id_length(self) -> int:
    """P: positions per identifier."""
    return len(self.position_sizes)

  @property
  def num_items(self) -> int:
    return int(self.leaf_items.shape[0])

  @property
  def num_leaves(self) -> int:
    return int(self.leaf_item_offsets.shape[0] - 1)

  def num_nodes(self, level: int) -> int:
    """Nodes at `level` (0: the root, P: the leaves)."""
    return 1 if level == 0 else int(self.codes[level - 1].shape[0])

  def max_children(self, level: int) -> int:
    """Largest fan-out of a node at `level` (0 <= level < P)."""
    return int(np.diff(self.offsets[level]).max())

  @property
  def nbytes(self) -> int:
    """Bytes of the host arrays."""
    arrays = list(self.offsets) + list(self.codes) + [self.leaf_item_offsets, self.leaf_items]
    return int(sum(a.nbytes for a in arrays))

  # --- host-side queries ----------------------------------------------------------------------
  def children(self, prefix: Sequence[int]) -> np.ndarray:
    """Codes allowed after `prefix` (length < P), ascending; empty if `prefix` is not indexed."""
    prefix = list(prefix)
    if len(prefix) >= self.id_length:
      return np.zeros(0, np.int32)
    node = self.lookup_prefixes(np.asarray([prefix], np.int64).reshape(1, len(prefix)))[0]
    if node < 0:
      return np.zeros(0, np.int32)
    level = len(prefix)
    lo, hi = self.offsets[level][node], self.offsets[level][node + 1]
    return self.codes[level][lo:hi].copy()

  def lookup_prefixes(self, prefixes: np.ndarray) -> np.ndarray:
    """`[M, l]` prefixes -> `[M]` node index at level l, -1 where the prefix is not indexed.

    Vectorised binary search in each node's sorted child slice.
    """
    prefixes = np.asarray(prefixes, np.int64)
    m, length = prefixes.shape
    node = np.zeros(m, np.int64)
    found = np.ones(m, bool)
    for level in range(length):
      off, codes = self.offsets[level], self.codes[level]
      safe = np.where(found, node, 0)
      lo, hi = off[safe].astype(np.int64), off[safe + 1].astype(np.int64)
      target = prefixes[:, level]
      # Binary search for `target` in codes[lo:hi] for every row at once.
      left, right = lo.copy(), hi.copy()
      for _ in range(int(np.ceil(np.log2(max(2, self.position_sizes[level] + 1)))) + 1):
        active = left < right
        mid = (left + right) // 2
        mid_val = codes[np.minimum(mid, codes.shape[0] - 1)]
        go_right = active & (mid_val < target)
        left = np.where(go_right, mid + 1, left)
        right = np.where(active & ~go_right, mid, right)
      hit = (left < hi) & (codes[np.minimum(left, codes.shape[0] - 1)] == target)
      found &= hit
      node = np.where(found, left, -1)
    return np.where(found, node, -1)

  def lookup(self, codes: np.ndarray) -> np.ndarray:
    """`[M, P]` identifiers -> `[M]` leaf index, -1 where not indexed."""
    codes = np.asarray(codes, np.int64)
    if codes.ndim != 2 or codes.shape[1] != self.id_length:
      raise UserError(
        f"voken trie: expected identifiers of shape [M, {self.id_length}], got {list(codes.shape)}"
      )
    return self.lookup_prefixes(codes)

  def leaf_codes(self) -> np.ndarray:
    """`[num_leaves, P]` the identifier of every leaf, in leaf order."""
    p = self.id_length
    out = np.zeros((self.num_leaves, p), np.int32)
    node = np.arange(self.num_leaves)
    for level in reversed(range(p)):
      out[:, level] = self.codes[level][node]
      # parent of node j at level+1: the i with offsets[i] <= j < offsets[i+1]
      node = np.searchsorted(self.offsets[level], node, side="right") - 1
    return out

  def items_of_leaf(self, leaf: int) -> np.ndarray:
    """All item ids whose identifier is leaf `leaf` (ascending)."""
    lo, hi = self.leaf_item_offsets[leaf], self.leaf_item_offsets[leaf + 1]
    return self.leaf_items[lo:hi].copy()

  def leaf_first_items(self) -> np.ndarray:
    """`int64[num_leaves]` the smallest item id of each leaf."""
    return self.leaf_items[self.leaf_item_offsets[:-1]]

  # --- persistence ----------------------------------------------------------------------------
  def save(self, path: str) -> None:
    """Writes an .npz atomically (avg_jax.artifacts.io)."""
    arrays = {
      "format_version": np.asarray(FORMAT_VERSION, np.int32),
      "position_sizes": np.asarray(self.position_sizes, np.int64),
      "leaf_item_offsets": self.leaf_item_offsets,
      "leaf_items": self.leaf_items,
    }
    for level in range(self.id_length):
      arrays[f"offsets_{level}"] = self.offsets[level]
      arrays[f"codes_{level}"] = self.codes[level]
    io.write_npz(path, **arrays)

  @classmethod
  def load(cls, path: str) -> "VokenTrie":
    """Reads a trie written by `save`; a missing or malformed file is a `UserError`."""
    if not os.path.isfile(path):
      raise UserError(f"voken trie file not found: {path}")
    try:
      with np.load(path) as data:
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
          raise UserError(f"voken trie {path}: format version {version}, expected {FORMAT_VERSION}")
        sizes = tuple(int(s) for s in data["position_sizes"])
        offsets = tuple(data[f"offsets_{p}"].astype(np.int32) for p in range(len(sizes)))
        codes = tuple(data[f"codes_{p}"].astype(np.int32) for p in range(len(sizes)))
        trie = cls(
          sizes,
          offsets,
          codes,
          data["leaf_item_offsets"].astype(np.int32),
          data["leaf_items"].astype(np.int64),
        )
    except (KeyError, *io.READ_ERRORS) as e:  # a truncated file is a zipfile.BadZipFile
      raise UserError(
        f"voken trie {path}: unreadable ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''})"
      ) from e
    trie.check()
    return trie

  def check(self) -> None:
    """Structural consistency checks (used after loading); raises `UserError`."""
    p = self.id_length
    if len(self.offsets) != p or len(self.codes) != p:
      raise UserError("voken trie: one offsets/codes array per position is required")
    for level in range(p):
      off = self.offsets[level]
      if (
        off.shape != (self.num_nodes(level) + 1,)
        or off[0] != 0
        or off[-1] != self.codes[level].shape[0]
        or (np.diff(off) <= 0).any()
      ):
        raise UserError(f"voken trie: inconsistent offsets at level {level}")
      c = self.codes[level]
      if c.size and (c.min() < 0 or c.max() >= self.position_sizes[level]):
        raise UserError(
          f"voken trie: code outside [0, {self.position_sizes[level]}) at level {level}"
        )
    lio = self.leaf_item_offsets
    if (
      lio.shape != (self.num_nodes(p) + 1,)
      or lio[0] != 0
      or lio[-1] != self.num_items
      or (np.diff(lio) <= 0).any()
    ):
      raise UserError("voken trie: inconsistent leaf item offsets")

  def item_rows(self, item_ids: np.ndarray) -> np.ndarray:
    """`int64[num_items]`: for each entry of `leaf_items`, its row in `item_ids [M]` (which
    must contain every indexed item; `UserError` otherwise)."""
    item_ids = np.asarray(item_ids, np.int64)
    order = np.argsort(item_ids, kind="stable")
    pos = np.minimum(np.searchsorted(item_ids, self.leaf_items, sorter=order), len(item_ids) - 1)
    rows = order[pos] if len(item_ids) else pos
    if len(item_ids) == 0 or (item_ids[rows] != self.leaf_items).any():
      missing = (
        self.leaf_items[item_ids[rows] != self.leaf_items] if len(item_ids) else self.leaf_items
      )
      raise UserError(f"voken trie: no embedding for indexed item {int(missing[0])}")
    return rows

  def node_alive(self, item_alive: np.ndarray) -> tuple[np.ndarray, ...]:
    """Which nodes still lead to a live item: `item_alive bool[num_items]` (`leaf_items`
    order) -> per level l = 1..P a `bool[n_l]` (a vectorised pass up the levels, O(nodes);
    every node has at least one child and every leaf one item, so `reduceat` is exact)."""
    alive = (
      np.add.reduceat(np.asarray(item_alive, np.int32), self.leaf_item_offsets[:-1]) > 0
    )  # [num_leaves]
    out = [alive]
    for level in range(self.id_length - 1, 0, -1):
      alive = np.add.reduceat(alive.astype(np.int32), self.offsets[level][:-1]) > 0
      out.append(alive)
    return tuple(reversed(out))

  def alive_masks(
    self, removed: np.ndarray, capacity: int | None = None
  ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """`(item_alive bool[num_items], node_alive)` (`node_alive`) with the items `removed`
    dead, for `DeviceTrie.with_alive`; each padded with False to `capacity` for a tree
    `to_device` padded to it."""
    alive = ~np.isin(self.leaf_items, removed)
    masks = (alive, *self.node_alive(alive))
    if capacity is not None:
      masks = tuple(np.pad(m, (0, capacity - len(m))) for m in masks)
    return masks[0], masks[1:]

  def to_device(
    self,
    dense_levels: int = 1,
    sharding=None,
    item_embeddings: tuple[np.ndarray, np.ndarray] | None = None,
    capacity: int | None = None,
  ) -> "DeviceTrie":
    """The device-resident transition structure (see `DeviceTrie`).

    Levels `l < dense_levels` become dense `[n_l, K_l]` child tables. `sharding`: where to put
    the arrays (default: jax's default device; pass a replicated `NamedSharding` for a mesh).
    `item_embeddings`: `(item ids int[M], embeddings float[M, D])` covering every indexed
    item: stored L2-normalised in `leaf_items` order, for ordering the items of a leaf by
    similarity to a query (`DeviceTrie.leaf_members`).

    `capacity` (>= the number of items): every node, leaf and item array is padded to it
    (nodes without children, leaves without items), every CSR window is the whole codebook
    (K_l) and `max_group` is rounded up to a power of two, so trees of up to `capacity` items
    share one shape, and so one compiled search, unless a leaf's images outgrow `max_group`
    (a live index's delta, `capacity_bucket`). Padded slots are never valid: a search over
    the padded tree returns what the exact one does.
    """
    if dense_levels < 0:
      raise UserError(f"trie: dense_levels must be >= 0, got {dense_levels}")
    if capacity is not None and capacity < self.num_items:
      raise UserError(f"trie: capacity {capacity} is below the {self.num_items} items")
    put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray

    def pad(a: np.ndarray, size: int, value) -> np.ndarray:
      """`a` padded along axis 0 to `size` rows of `value` (unchanged without a capacity)."""
      if capacity is None:
        return a
      return np.concatenate([a, np.full((size - a.shape[0], *a.shape[1:]), value, a.dtype)])

    tables: list[tuple[jax.Array, ...]] = []
    widths, dense = [], []
    cap = capacity or 0  # a level never has more nodes than there are items
    for level in range(self.id_length):
      k = self.position_sizes[level]
      if level < dense_levels:
        n = self.num_nodes(level)
        table = np.full((n, k), -1, np.int32)
        parent = np.repeat(np.arange(n), np.diff(self.offsets[level]))
        table[parent, self.codes[level]] = np.arange(self.codes[level].shape[0], dtype=np.int32)
        tables.append((put(pad(table, cap, -1)),))
        widths.append(k)
        dense.append(True)
      else:
        offsets = self.offsets[level]
        tables.append(
          (put(pad(offsets, cap + 1, offsets[-1])), put(pad(self.codes[level], cap, 0)))
        )
        widths.append(self.max_children(level) if capacity is None else k)
        dense.append(False)
    item_emb = None
    if item_embeddings is not None:
      ids, emb = item_embeddings
      emb = np.asarray(emb, np.float32)[self.item_rows(ids)]
      norm = np.linalg.norm(emb, axis=1, keepdims=True)
      item_emb = put(pad(emb / np.maximum(norm, 1e-12), cap, 0.0))
    leaf_offsets = self.leaf_item_offsets.astype(np.int32)
    max_group = int(np.diff(self.leaf_item_offsets).max())
    return DeviceTrie(
      levels=tuple(tables),
      leaf_item=put(pad(self.leaf_first_items().astype(np.int32), cap, -1)),
      leaf_item_offsets=put(pad(leaf_offsets, cap + 1, leaf_offsets[-1])),
      leaf_items=put(pad(self.leaf_items.astype(np.int32), cap, -1)),
      item_emb=item_emb,
      item_alive=None,
      node_alive=None,
      position_sizes=self.position_sizes,
      dense=tuple(dense),
      widths=tuple(widths),
      max_group=max_group if capacity is None else min(_next_power_of_two(max_group), cap),
    )


@flax.struct.dataclass
class DeviceTrie:
  """The trie as device arrays: per level a dense child table or a CSR pair.

  `levels[l]` is `(table int32[n_l, K_l],)` when `dense[l]`, else `(offsets int32[n_l + 1],
  codes int32[n_{l+1}])`; `leaf_item int32[num_leaves]` is each leaf's (smallest) item id;
  `leaf_item_offsets int32[num_leaves + 1]` / `leaf_items int32[num_items]` list every item of
  every leaf (ascending ids); `item_emb float32[num_items, D]` (optional) their normalised
  embeddings in `leaf_items` order. `widths[l]` is the candidate-window width of level l (K_l
  dense, largest fan-out CSR); `max_group` the most items of one leaf.
  """

  levels: tuple
  leaf_item: jax.Array
  leaf_item_offsets: jax.Array
  leaf_items: jax.Array
  item_emb: jax.Array | None
  item_alive: jax.Array | None  # bool[num_items] in `leaf_items` order; None: all alive
  # Per level l = 1..P, bool[n_l]: the node leads to a live item (`VokenTrie.node_alive`).
  # A search never enters a subtree whose items are all removed, so removed images cost no
  # beam slots. None: all alive.
  node_alive: tuple | None
  position_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)
  dense: tuple[bool, ...] = flax.struct.field(pytree_node=False)
  widths: tuple[int, ...] = flax.struct.field(pytree_node=False)
  max_group: int = flax.struct.field(pytree_node=False, default=1)

  @property
  def id_length(self) -> int:
    return len(self.position_sizes)

  @property
  def max_width(self) -> int:
    return max(self.widths)

  @property
  def nbytes(self) -> int:
    """Device bytes of the tree's arrays (without `item_emb`, see `embedding_nbytes`)."""
    return int(
      sum(
        x.nbytes
        for x in jax.tree.leaves(
          dataclasses.replace(self, item_emb=None, item_alive=None, node_alive=None)
        )
      )
    )

  @property
  def embedding_nbytes(self) -> int:
    """Device bytes of the items' embeddings (0 without them)."""
    return 0 if self.item_emb is None else int(self.item_emb.nbytes)

  def leaf_members(self, leaf: jax.Array, width: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The first `width` items of each leaf: `leaf int32[...]` (-1: none) ->
    `items int32[..., width]`, `pos int32[..., width]` (index into `leaf_items` / `item_emb`)
    and `valid bool[..., width]`. Items come in ascending id order."""
    safe = jnp.maximum(leaf, 0)
    start = self.leaf_item_offsets[safe]
    count = jnp.where(leaf >= 0, self.leaf_item_offsets[safe + 1] - start, 0)
    slot = jnp.arange(width, dtype=jnp.int32)
    valid = slot < count[..., None]
    pos = jnp.where(valid, start[..., None] + slot, 0)
    if self.item_alive is not None:  # removed items stay in the tree, marked dead
      valid = valid & self.item_alive[pos]
    return jnp.where(valid, self.leaf_items[pos], -1), pos, valid

  def members(
    self, leaf: jax.Array, width: int, with_embeddings: bool
  ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """`leaf_members` as `(items [..., width], valid [..., width], embeddings [..., width, D]
    or None)`: the form `search.expand_leaves` uses for every kind of index."""
    items, pos, valid = self.leaf_members(leaf, width)
    emb = self.item_emb[pos] if with_embeddings and self.item_emb is not None else None
    return items, valid, emb

  def with_alive(self, alive: jax.Array | None, node_alive: tuple | None = None) -> "DeviceTrie":
    """The same tree with `item_alive` replaced (bool[num_items] in `leaf_items` order) and,
    optionally, `node_alive` (`VokenTrie.node_alive`: dead subtrees are never entered)."""
    return dataclasses.replace(self, item_alive=alive, node_alive=node_alive)

  def children_guarded(
    self, level: int, node: jax.Array, width: int
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`children` for nodes that may be -1 (absent): no children there."""
    codes, child, valid = self.children(level, jnp.maximum(node, 0), width)
    valid = valid & (node >= 0)[:, None]
    return jnp.where(valid, codes, 0), jnp.where(valid, child, -1), valid

  def children(
    self, level: int, node: jax.Array, width: int
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Candidate children of `node [n]` at static `level` (< P) in a window of `width`.

    Returns `codes int32[n, width]`, `child int32[n, width]` (node index at level+1) and
    `valid bool[n, width]`. `node` must be a node of `level` (beams always are). Children
    whose subtree holds no live item (`node_alive`) are not valid.
    """
    codes, child, valid = self._children(level, node, width)
    if self.node_alive is None:
      return codes, child, valid
    valid = valid & self.node_alive[level][jnp.maximum(child, 0)]
    return jnp.where(valid, codes, 0), jnp.where(valid, child, -1), valid

  def _children(
    self, level: int, node: jax.Array, width: int
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.dense[level]:
      (table,) = self.levels[level]
      child = table[node]  # [n, K_l]
      k = child.shape[-1]
      codes = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), child.shape)
      if width > k:  # another level is wider: pad with invalid slots
        pad = ((0, 0), (0, width - k))
        child = jnp.pad(child, pad, constant_values=-1)
        codes = jnp.pad(codes, pad)
      return codes[:, :width], child[:, :width], child[:, :width] >= 0
    offsets, level_codes = self.levels[level]
    start = offsets[node]  # [n]
    count = offsets[node + 1] - start  # [n]
    slot = jnp.arange(width, dtype=jnp.int32)  # [width]
    child = start[:, None] + slot[None, :]  # [n, width]
    valid = slot[None, :] < count[:, None]  # [n, width]
    child = jnp.where(valid, child, 0)
    codes = jnp.where(valid, level_codes[child], 0)
    return codes, jnp.where(valid, child, -1), valid


@flax.struct.dataclass
class Unconstrained:
  """Every code at every position is allowed: plain fixed-length beam search over vokens.

  Has the same `children` interface as `DeviceTrie`; `child` is always 0 (no nodes).
  """

  position_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)

  @property
  def id_length(self) -> int:
    return len(self.position_sizes)

  @property
  def widths(self) -> tuple[int, ...]:
    return self.position_sizes

  @property
  def max_width(self) -> int:
    return max(self.position_sizes)

  def children(
    self, level: int, node: jax.Array, width: int
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    slot = jnp.arange(width, dtype=jnp.int32)
    shape = (node.shape[0], width)
    codes = jnp.broadcast_to(slot, shape)
    valid = jnp.broadcast_to(slot < self.position_sizes[level], shape)
    return codes, jnp.zeros(shape, jnp.int32), valid
