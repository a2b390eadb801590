"""The live index of a serving checkpoint: images added and removed without retraining.

An export indexes its images in `trie.npz` / `voken_table.npz` (the base). Later changes live
in versioned folders beside them:

    <export>/live/CURRENT            {"version": n}: the state readers load
    <export>/live/v<n>/delta.npz     image_ids int64[M], codes int32[M, T], file_names str[M],
                                     embeddings float32[M, D] (when the export has them),
                                     captions str[M] (each a JSON list; optional): every
                                     image added since the base was written
    <export>/live/v<n>/removed.npy   int64[R]: image ids removed (from the base or the delta)
    <export>/live/LOCK               held by the one process that writes
    <export>/live/thumbnails/<id>    added images' thumbnails (written before the version that
                                     adds them; ids are never reused, so one never changes)

A change writes the next version's folder completely, then replaces CURRENT (an atomic
rename): a crash or kill -9 at any point leaves the previous version loadable, and a reader
never sees a half-written one; versions older than the previous one are removed after the
switch. The cost of a
change is the size of the delta (it is rewritten whole) and never the base's.

Searching: the base tree is built once; the delta's tree is rebuilt from the delta alone at
each change (O(added), independent of the index size) and searched together with the base as
one `UnionTrie`. Removed images are marked dead in the trees (they keep their leaves), and
every node whose subtree has no live image left is masked, so the search never spends a beam
slot on a removed image's path (`VokenTrie.node_alive`: one O(nodes) pass, no rebuild).

Identifiers of added images: their semantic codes (from the export's frozen RQ tokenizer);
with a learned disambiguation position, the next free index among the images of the index
that share those codes (an image keeps its identifier after removal: it is never reused).
"""

import fcntl
import json
import os
import shutil
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from avg_jax.artifacts import io
from avg_jax.decoding.trie import DeviceTrie, VokenTrie
from avg_jax.decoding.union_trie import UnionTrie
from avg_jax.errors import UserError

FOLDER = "live"
CURRENT = "CURRENT"
LOCK = "LOCK"
THUMBNAILS = "thumbnails"
# Seconds `save` sleeps between writing a version and switching to it: lets the crash test
# kill a writer at exactly that point (never set in normal use).
PAUSE_ENV = "AVG_JAX_LIVE_PAUSE_BEFORE_SWITCH"


class WriteLock:
  """An exclusive lock on `<export>/live/LOCK` for one writing process (released on exit or
  crash by the OS: a killed writer never leaves it stuck)."""

  def __init__(self, export_dir: str):
    os.makedirs(os.path.join(export_dir, FOLDER), exist_ok=True)
    self.path = os.path.join(export_dir, FOLDER, LOCK)
    self._file = None

  def __enter__(self):
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      self._file.close()
      raise UserError(f"{self.path}: another process is changing this index; retry when it "
                      f"has finished") from e
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


class LiveIndex:
  """The indexed images: the base plus a delta, minus the removed ones (see module doc)."""

  def __init__(self, *, base_ids: np.ndarray, base_codes: np.ndarray, base_names: np.ndarray,
               position_sizes: Sequence[int], num_levels: int,
               base_embeddings: np.ndarray | None = None, base_trie: VokenTrie | None = None):
    """`base_trie`: the tree of the base codes when already built (an export's trie.npz)."""
    self.position_sizes = tuple(int(s) for s in position_sizes)
    self.num_levels = int(num_levels)
    self.base_ids = np.asarray(base_ids, np.int64)
    self.base_codes = np.asarray(base_codes, np.int32)
    self.base_names = np.asarray(base_names, str)
    self.base_embeddings = base_embeddings
    self.delta_ids = np.zeros((0,), np.int64)
    self.delta_codes = np.zeros((0, len(self.position_sizes)), np.int32)
    self.delta_names = np.zeros((0,), str)
    self.delta_captions = np.zeros((0,), str)   # JSON lists of captions, "[]" when none
    self.delta_embeddings = (None if base_embeddings is None
                             else np.zeros((0, base_embeddings.shape[1]), np.float32))
    self.removed = np.zeros((0,), np.int64)
    self.version = 0
    if base_trie is None and len(self.base_ids):
      base_trie = VokenTrie.build(self.base_codes, self.base_ids, self.position_sizes)
    self._base_trie = base_trie
    # The base's device arrays, made once per (dense_levels, sharding): a change then costs
    # O(added) (+ an O(nodes) mask pass when images were removed), never a copy of the base.
    self._base_device: dict = {}

  # --- what is indexed ------------------------------------------------------------------------
  @property
  def learned_suffix(self) -> bool:
    return len(self.position_sizes) > self.num_levels

  def all_ids(self) -> np.ndarray:
    return np.concatenate([self.base_ids, self.delta_ids])

  def live_ids(self) -> np.ndarray:
    """Ids of the images a search can return, ascending."""
    return np.setdiff1d(self.all_ids(), self.removed)

  def captions(self) -> dict[int, list[str]]:
    """Captions given with added images (the base's live in the export's gallery)."""
    return {int(i): json.loads(c) for i, c in zip(self.delta_ids, self.delta_captions)
            if c and c != "[]"}

  def file_names(self) -> dict[int, str]:
    return {int(i): str(n) for i, n in zip(np.concatenate([self.base_ids, self.delta_ids]),
                                           np.concatenate([self.base_names, self.delta_names]))}

  # --- changes --------------------------------------------------------------------------------
  def identifiers(self, semantic: np.ndarray) -> np.ndarray:
    """Identifiers for new images with semantic codes `[M, L]` (module doc)."""
    semantic = np.asarray(semantic, np.int32)
    if semantic.ndim != 2 or semantic.shape[1] != self.num_levels:
      raise UserError(f"live index: expected semantic codes [M, {self.num_levels}], got "
                      f"{list(semantic.shape)}")
    if not self.learned_suffix:
      return semantic
    levels = self.num_levels
    taken: dict[tuple, int] = {}
    if self._base_trie is not None and len(semantic):
      # The base's largest index under each new image's codes: the last child of that node
      # (children are sorted by code) -- O(added), whatever the base's size.
      node = self._base_trie.lookup_prefixes(semantic)
      offsets, codes = self._base_trie.offsets[levels], self._base_trie.codes[levels]
      safe = np.maximum(node, 0)
      last = codes[np.maximum(offsets[safe + 1] - 1, 0)]
      for row, n, c in zip(semantic, node, last):
        if n >= 0:
          taken[tuple(row.tolist())] = int(c) + 1
    for row in self.delta_codes:       # the delta is small: a plain loop
      key = tuple(row[:levels].tolist())
      taken[key] = max(taken.get(key, 0), int(row[-1]) + 1)
    out = np.zeros((len(semantic), len(self.position_sizes)), np.int32)
    limit = self.position_sizes[-1]
    for i, row in enumerate(semantic):
      key = tuple(row.tolist())
      index = taken.get(key, 0)
      if index >= limit:
        raise UserError(f"live index: {index + 1} images would share the codes {list(key)}, "
                        f"the vocabulary has {limit} disambiguation tokens (use a tie-break "
                        f"by image id or similarity, which has no such limit)")
      taken[key] = index + 1
      out[i, :self.num_levels], out[i, -1] = row, index
    return out

  def add(self, image_ids: np.ndarray, semantic: np.ndarray, file_names: Sequence[str],
          embeddings: np.ndarray | None = None,
          captions: Sequence[Sequence[str]] | None = None) -> np.ndarray:
    """Adds images (ids must be new to the index, removed ones included); -> identifiers."""
    if captions is not None and len(captions) != len(file_names):
      raise UserError("live index: give one list of captions per added image")
    image_ids = np.asarray(image_ids, np.int64)
    if image_ids.ndim != 1 or len(image_ids) != len(semantic) or len(file_names) != len(image_ids):
      raise UserError("live index: image ids, codes and file names must have one row each")
    if len(np.unique(image_ids)) != len(image_ids):
      raise UserError("live index: an image id repeats among the added images")
    clash = np.intersect1d(image_ids, self.all_ids())
    if len(clash):
      raise UserError(f"live index: image id {int(clash[0])} is already indexed (ids are "
                      f"never reused, removed ones included)")
    if (image_ids < 0).any() or (image_ids > np.iinfo(np.int32).max).any():
      raise UserError("live index: image ids must lie in [0, 2^31 - 1]")
    if (self.delta_embeddings is None) != (embeddings is None):
      raise UserError("live index: this index keeps image embeddings; give them (or none)")
    codes = self.identifiers(semantic)
    self.delta_ids = np.concatenate([self.delta_ids, image_ids])
    self.delta_codes = np.concatenate([self.delta_codes, codes])
    self.delta_names = np.concatenate([self.delta_names, np.asarray(list(file_names), str)])
    caption_rows = [json.dumps([str(c) for c in row]) for row in
                    (captions if captions is not None else [[]] * len(image_ids))]
    self.delta_captions = np.concatenate([self.delta_captions,
                                          np.asarray(caption_rows, str).reshape(-1)])
    if embeddings is not None:
      self.delta_embeddings = np.concatenate([self.delta_embeddings,
                                              np.asarray(embeddings, np.float32)])
    return codes

  def remove(self, image_ids: Sequence[int]) -> None:
    image_ids = np.asarray(image_ids, np.int64)
    unknown = np.setdiff1d(image_ids, self.live_ids())
    if len(unknown):
      raise UserError(f"live index: image id {int(unknown[0])} is not in the index")
    self.removed = np.union1d(self.removed, image_ids)

  # --- search structure -----------------------------------------------------------------------
  def _with_alive(self, device: DeviceTrie, trie: VokenTrie) -> DeviceTrie:
    """`device` with the removed images marked dead, their emptied subtrees pruned (one
    O(nodes) numpy pass over the tree, no rebuild)."""
    if not len(self.removed):
      return device
    alive = ~np.isin(trie.leaf_items, self.removed)
    return device.with_alive(jnp.asarray(alive),
                             tuple(jnp.asarray(a) for a in trie.node_alive(alive)))

  def device(self, dense_levels: int = 1, sharding=None) -> DeviceTrie | UnionTrie:
    """The search constraint: the base tree, or the base and the delta as one."""
    if not len(self.live_ids()):
      raise UserError("live index: no image is indexed")
    embed = self.base_embeddings is not None
    parts = []
    if self._base_trie is not None:
      key = (dense_levels, sharding)
      if key not in self._base_device:
        emb = (self.base_ids, self.base_embeddings) if embed else None
        self._base_device[key] = self._base_trie.to_device(dense_levels, sharding,
                                                           item_embeddings=emb)
      parts.append(self._with_alive(self._base_device[key], self._base_trie))
    if len(self.delta_ids):
      delta = VokenTrie.build(self.delta_codes, self.delta_ids, self.position_sizes)
      emb = (self.delta_ids, self.delta_embeddings) if embed else None
      parts.append(self._with_alive(delta.to_device(0, sharding, item_embeddings=emb), delta))
    return parts[0] if len(parts) == 1 else UnionTrie.of(*parts)

  # --- persistence ----------------------------------------------------------------------------
  def save(self, export_dir: str) -> None:
    """Writes the next version and switches CURRENT to it (hold a `WriteLock`)."""
    folder = os.path.join(export_dir, FOLDER)
    version = self.version + 1
    target = os.path.join(folder, f"v{version}")
    shutil.rmtree(target, ignore_errors=True)   # left by a writer that died before switching
    os.makedirs(target)
    arrays = dict(image_ids=self.delta_ids, codes=self.delta_codes, file_names=self.delta_names,
                  captions=self.delta_captions)
    if self.delta_embeddings is not None:
      arrays["embeddings"] = self.delta_embeddings
    io.write_npz(os.path.join(target, "delta.npz"), **arrays)
    io.write_npz(os.path.join(target, "removed.npz"), removed=self.removed)
    if os.environ.get(PAUSE_ENV):
      print(f"live index: v{version} written, switching in {os.environ[PAUSE_ENV]} s",
            flush=True)
      time.sleep(float(os.environ[PAUSE_ENV]))
    io.write_json(os.path.join(folder, CURRENT), {"version": version})   # the switch
    self.version = version
    # Older versions go after the switch; the previous one stays for a reader that read
    # CURRENT just before it.
    for name in os.listdir(folder):
      if name.startswith("v") and name[1:].isdigit() and int(name[1:]) < version - 1:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

  def load_changes(self, export_dir: str) -> None:
    """Reads the version CURRENT names (nothing when the index never changed)."""
    folder = os.path.join(export_dir, FOLDER)
    current = os.path.join(folder, CURRENT)
    if not os.path.exists(current):
      return
    try:
      with open(current, encoding="utf-8") as f:
        version = int(json.load(f)["version"])
      target = os.path.join(folder, f"v{version}")
      delta_path = os.path.join(target, "delta.npz")
      with np.load(delta_path) as f:
        optional = tuple(k for k in ("embeddings", "captions") if k in f.files)
      f = io.read_npz(delta_path, ("image_ids", "codes", "file_names") + optional)
      ids, codes, names, emb = f["image_ids"], f["codes"], f["file_names"], f.get("embeddings")
      captions = f.get("captions", np.full(len(ids), "[]"))
      removed = io.read_npz(os.path.join(target, "removed.npz"), ("removed",))["removed"]
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
      raise UserError(f"{folder}: damaged live index ({type(e).__name__}: {e})") from e
    if codes.ndim != 2 or codes.shape[1] != len(self.position_sizes) or len(ids) != len(codes):
      raise UserError(f"{target}/delta.npz: codes of shape {list(codes.shape)} do not fit "
                      f"this export's identifiers")
    self.delta_ids, self.delta_codes = ids.astype(np.int64), codes.astype(np.int32)
    self.delta_names = names.astype(str)
    self.delta_captions = np.asarray(captions, str).reshape(-1)
    if self.delta_embeddings is not None:
      if emb is None:
        raise UserError(f"{target}/delta.npz: no embeddings for the added images")
      self.delta_embeddings = emb.astype(np.float32)
    self.removed = removed.astype(np.int64)
    self.version = version
