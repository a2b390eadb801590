"""The live index of a serving checkpoint: images added and removed without retraining.

An export indexes its images in `trie.npz` / `voken_table.npz` (the base). Later changes live
in versioned folders beside them:

    <export>/live/CURRENT            the version readers load, sealed: {"format": 2, "version":
                                     n, "parent": p, "files": {name: {"size", "sha256"}},
                                     "checksum": SHA-256 of the rest}
    <export>/live/v<n>/delta.npz     every image added since the base was written:
                                     image_ids int64[M], codes int32[M, T], embeddings
                                     float32[M, D] (when the export has them), file names and
                                     captions as UTF-8 bytes + offsets (names_utf8 uint8[B],
                                     names_offsets int64[M + 1]; captions_* the same, each
                                     image's captions one JSON list), layout int64 (2)
    <export>/live/v<n>/removed.npz   removed int64[R]: image ids removed (base or delta)
    <export>/live/v<n>/COMMITTED     written once CURRENT named v<n>
    <export>/live/LOCK               held by the one process that writes
    <export>/live/thumbnails/<id>    added images' thumbnails (written before the version that
                                     adds them; ids are never reused, so one never changes)

A change writes a new version's folder completely, then replaces CURRENT (an atomic rename):
a crash or kill -9 at any point leaves the previous version loadable, and a reader never sees
a half-written one. A writer never overwrites a version folder: a new version's number is one
above every folder and CURRENT's. After the switch it removes the committed versions older
than the previous one and the folders of writers that died before switching.

CURRENT is checked when it is read: its checksum (a hand edit, e.g. "version": 3 -> 2, is
refused), its version's files against their recorded sizes and SHA-256, and that no version
newer than it was ever committed (a restored old CURRENT would silently drop the images added
since). Any of these is a `LiveIndexDamaged` error naming what differs: the index is not
served from a state nobody wrote. Live indexes written before the seal (CURRENT holding only
{"version": n}, delta.npz with fixed-width string arrays) still load.

Strings: file names and captions are stored as one UTF-8 byte string and offsets, so the
files grow with the text's total length, not with the longest string times the image count
(fixed-width numpy strings padded every name to the longest: one 100 000-character name made
a 181 MB delta). Their lengths are bounded (`MAX_FILE_NAME_CHARS`, `MAX_CAPTION_CHARS`,
`MAX_CAPTIONS`).

Image ids lie in [0, `MAX_ID`] (2^31 - 1). Automatic ids (`next_ids`) continue after the
largest id ever indexed (removed ones included: ids are never reused); when that would pass
`MAX_ID` (an image was added with a very large explicit id), they are the smallest ids never
used, so no explicit id can exhaust them.

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
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from avg_jax.artifacts import io
from avg_jax.decoding.trie import DeviceTrie, VokenTrie, capacity_bucket
from avg_jax.decoding.union_trie import UnionTrie
from avg_jax.errors import UserError

FOLDER = "live"
CURRENT = "CURRENT"
LOCK = "LOCK"
THUMBNAILS = "thumbnails"
COMMITTED = "COMMITTED"
CURRENT_FORMAT = 2
LAYOUT = 2  # delta.npz with UTF-8 strings + offsets
MAX_ID = 2**31 - 1
MAX_FILE_NAME_CHARS = 1024
MAX_CAPTION_CHARS = 2000
MAX_CAPTIONS = 32
# Seconds `save` sleeps between writing a version and switching to it: lets the crash test
# kill a writer at exactly that point (never set in normal use).
PAUSE_ENV = "AVG_JAX_LIVE_PAUSE_BEFORE_SWITCH"


class LiveIndexDamaged(UserError):
  """The live index's files are damaged or were changed by hand: the fault of the machine
  that serves them, never of a client (the service answers it with a 500)."""


def check_texts(file_name: str, captions: Sequence[str], where: str) -> None:
  """A `UserError` naming `where` (e.g. "image 3") when a file name or a caption is not a
  string, is too long or holds a lone surrogate (not storable as UTF-8)."""
  if not isinstance(file_name, str):
    raise UserError(f"{where}: file name must be a string, got {type(file_name).__name__}")
  if len(file_name) > MAX_FILE_NAME_CHARS:
    raise UserError(
      f"{where}: file name of {len(file_name)} characters, the limit is {MAX_FILE_NAME_CHARS}"
    )
  if isinstance(captions, str) or len(captions) > MAX_CAPTIONS:
    raise UserError(f"{where}: expected a list of at most {MAX_CAPTIONS} captions")
  for j, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise UserError(f"{where}: caption {j} must be a string, got {type(caption).__name__}")
    if len(caption) > MAX_CAPTION_CHARS:
      raise UserError(
        f"{where}: caption {j} of {len(caption)} characters, the limit is {MAX_CAPTION_CHARS}"
      )
  for text in (file_name, *captions):
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:
      raise UserError(
        f"{where}: text with a lone surrogate at character {e.start} (not valid Unicode)"
      ) from e


def parse_id(text: str) -> int:
  """An image id written as decimal ASCII digits in [0, MAX_ID]; a `ValueError` with the
  reason otherwise (signs, spaces, `1_0`, other scripts' digits: Python's `int` takes them
  all, so an Arabic-Indic "3603" would name image 3603)."""
  if not (isinstance(text, str) and text.isascii() and text.isdigit()):
    raise ValueError(f"{str(text)[:40]!r} is not an image id (decimal digits 0-9)")
  if len(text) > len(str(MAX_ID)) or int(text) > MAX_ID:
    raise ValueError(
      f"{text[:40]!r}{'...' if len(text) > 40 else ''} is outside the image id range [0, {MAX_ID}]"
    )
  return int(text)


def _pack(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """`(UTF-8 bytes uint8[B], offsets int64[M + 1])` of M strings."""
  encoded = [t.encode("utf-8") for t in texts]
  offsets = np.zeros(len(encoded) + 1, np.int64)
  np.cumsum([len(e) for e in encoded], out=offsets[1:])
  return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _unpack(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
  """The strings `_pack` stored (`ValueError` when the offsets do not fit the bytes)."""
  offsets = np.asarray(offsets, np.int64)
  if (
    offsets.ndim != 1
    or not len(offsets)
    or offsets[0] != 0
    or (np.diff(offsets) < 0).any()
    or offsets[-1] != len(blob)
  ):
    raise ValueError("string offsets do not fit the stored bytes")
  data = np.asarray(blob, np.uint8).tobytes()
  return [data[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _seal(record: dict) -> dict:
  body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
  return dict(record, checksum=hashlib.sha256(body).hexdigest())


def _versions(folder: str) -> list[int]:
  """The numbers of the `v<n>` folders in `folder`, ascending."""
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return []
  return sorted(
    int(n[1:]) for n in names if n.startswith("v") and n[1:].isascii() and n[1:].isdigit()
  )


def _file_record(path: str) -> dict:
  return {"size": os.path.getsize(path), "sha256": io.file_sha256(path)}


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
      raise UserError(
        f"{self.path}: another process is changing this index; retry when it has finished"
      ) from e
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


class LiveIndex:
  """The indexed images: the base plus a delta, minus the removed ones (see module doc)."""

  def __init__(
    self,
    *,
    base_ids: np.ndarray,
    base_codes: np.ndarray,
    base_names: np.ndarray,
    position_sizes: Sequence[int],
    num_levels: int,
    base_embeddings: np.ndarray | None = None,
    base_trie: VokenTrie | None = None,
  ):
    """`base_trie`: the tree of the base codes when already built (an export's trie.npz)."""
    self.position_sizes = tuple(int(s) for s in position_sizes)
    self.num_levels = int(num_levels)
    self.base_ids = np.asarray(base_ids, np.int64)
    self.base_codes = np.asarray(base_codes, np.int32)
    self.base_names = [str(n) for n in np.asarray(base_names, str).tolist()]
    self.base_embeddings = base_embeddings
    self.delta_ids = np.zeros((0,), np.int64)
    self.delta_codes = np.zeros((0, len(self.position_sizes)), np.int32)
    # Python lists, replaced (never changed in place) at each change: a copy of this index
    # shares them with the searches still reading the old one.
    self.delta_names: list[str] = []
    self.delta_captions: list[list[str]] = []
    self.delta_embeddings = (
      None if base_embeddings is None else np.zeros((0, base_embeddings.shape[1]), np.float32)
    )
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
    return {int(i): list(c) for i, c in zip(self.delta_ids.tolist(), self.delta_captions) if c}

  def file_names(self) -> dict[int, str]:
    return dict(zip(self.all_ids().tolist(), self.base_names + self.delta_names))

  def next_ids(self, count: int) -> np.ndarray:
    """`count` automatic ids (module doc): after the largest id ever indexed, else the
    smallest never used."""
    used = np.unique(self.all_ids())
    start = int(used[-1]) + 1 if len(used) else 0
    if start + count - 1 <= MAX_ID:
      return np.arange(start, start + count, dtype=np.int64)
    out: list[int] = []
    candidate = 0
    for taken in used.tolist() + [MAX_ID + 1]:
      while candidate < taken and len(out) < count:
        out.append(candidate)
        candidate += 1
      if len(out) == count:
        return np.asarray(out, np.int64)
      candidate = taken + 1
    raise UserError(f"live index: no {count} free image ids left in [0, {MAX_ID}]")

  # --- changes --------------------------------------------------------------------------------
  def identifiers(self, semantic: np.ndarray) -> np.ndarray:
    """Identifiers for new images with semantic codes `[M, L]` (module doc)."""
    semantic = np.asarray(semantic, np.int32)
    if semantic.ndim != 2 or semantic.shape[1] != self.num_levels:
      raise UserError(
        f"live index: expected semantic codes [M, {self.num_levels}], got {list(semantic.shape)}"
      )
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
    for row in self.delta_codes:  # the delta is small: a plain loop
      key = tuple(row[:levels].tolist())
      taken[key] = max(taken.get(key, 0), int(row[-1]) + 1)
    out = np.zeros((len(semantic), len(self.position_sizes)), np.int32)
    limit = self.position_sizes[-1]
    for i, row in enumerate(semantic):
      key = tuple(row.tolist())
      index = taken.get(key, 0)
      if index >= limit:
        raise UserError(
          f"live index: {index + 1} images would share the codes {list(key)}, "
          f"the vocabulary has {limit} disambiguation tokens (use a tie-break "
          f"by image id or similarity, which has no such limit)"
        )
      taken[key] = index + 1
      out[i, : self.num_levels], out[i, -1] = row, index
    return out

  def add(
    self,
    image_ids: np.ndarray,
    semantic: np.ndarray,
    file_names: Sequence[str],
    embeddings: np.ndarray | None = None,
    captions: Sequence[Sequence[str]] | None = None,
  ) -> np.ndarray:
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
      raise UserError(
        f"live index: image id {int(clash[0])} is already indexed (ids are "
        f"never reused, removed ones included)"
      )
    if (image_ids < 0).any() or (image_ids > MAX_ID).any():
      raise UserError(f"live index: image ids must lie in [0, {MAX_ID}]")
    rows = captions if captions is not None else [[]] * len(image_ids)
    for image_id, name, caps in zip(image_ids.tolist(), file_names, rows):
      check_texts(name, caps, f"live index: image {image_id}")
    if (self.delta_embeddings is None) != (embeddings is None):
      raise UserError("live index: this index keeps image embeddings; give them (or none)")
    codes = self.identifiers(semantic)
    self.delta_ids = np.concatenate([self.delta_ids, image_ids])
    self.delta_codes = np.concatenate([self.delta_codes, codes])
    self.delta_names = self.delta_names + [str(n) for n in file_names]
    self.delta_captions = self.delta_captions + [[str(c) for c in row] for row in rows]
    if embeddings is not None:
      self.delta_embeddings = np.concatenate(
        [self.delta_embeddings, np.asarray(embeddings, np.float32)]
      )
    return codes

  def remove(self, image_ids: Sequence[int] | np.ndarray) -> None:
    ids = np.asarray(image_ids, np.int64)
    unknown = np.setdiff1d(ids, self.live_ids())
    if len(unknown):
      raise UserError(f"live index: image id {int(unknown[0])} is not in the index")
    self.removed = np.union1d(self.removed, ids)

  # --- search structure -----------------------------------------------------------------------
  def _with_alive(
    self, device: DeviceTrie, trie: VokenTrie, capacity: int | None = None
  ) -> DeviceTrie:
    """`device` with the removed images marked dead, their emptied subtrees pruned (one
    O(nodes) numpy pass over the tree, no rebuild). `capacity`: the one `device` was padded
    to (its padding is dead too)."""
    if not len(self.removed):
      return device
    items, nodes = trie.alive_masks(self.removed, capacity)
    return device.with_alive(jnp.asarray(items), tuple(jnp.asarray(m) for m in nodes))

  def device(self, dense_levels: int = 1, sharding=None) -> DeviceTrie | UnionTrie:
    """The search constraint: the base tree, or the base and the delta as one."""
    if not len(self.live_ids()):
      raise UserError("live index: no image is indexed")
    # Both embeddings or neither (`add` keeps them together).
    base_emb, delta_emb = self.base_embeddings, self.delta_embeddings
    parts: list[DeviceTrie] = []
    if self._base_trie is not None:
      key = (dense_levels, sharding)
      if key not in self._base_device:
        emb = (self.base_ids, base_emb) if base_emb is not None else None
        self._base_device[key] = self._base_trie.to_device(
          dense_levels, sharding, item_embeddings=emb
        )
      parts.append(self._with_alive(self._base_device[key], self._base_trie))
    if len(self.delta_ids):
      # Padded to a capacity bucket: adding or removing images keeps the delta's shapes (and
      # the compiled searches) until the delta doubles.
      delta = VokenTrie.build(self.delta_codes, self.delta_ids, self.position_sizes)
      emb = (self.delta_ids, delta_emb) if delta_emb is not None else None
      capacity = capacity_bucket(len(self.delta_ids))
      device = delta.to_device(0, sharding, item_embeddings=emb, capacity=capacity)
      parts.append(self._with_alive(device, delta, capacity))
    return parts[0] if len(parts) == 1 else UnionTrie.of(*parts)

  # --- persistence ----------------------------------------------------------------------------
  def save(self, export_dir: str) -> None:
    """Writes a new version and switches CURRENT to it (hold a `WriteLock`; module doc)."""
    folder = os.path.join(export_dir, FOLDER)
    os.makedirs(folder, exist_ok=True)
    on_disk = _versions(folder)
    version = max([self.version] + on_disk) + 1  # never a folder that exists
    target = os.path.join(folder, f"v{version}")
    os.makedirs(target)
    names_utf8, names_offsets = _pack(self.delta_names)
    captions_utf8, captions_offsets = _pack(
      [json.dumps(c, ensure_ascii=False) for c in self.delta_captions]
    )
    arrays = dict(
      layout=np.int64(LAYOUT),
      image_ids=self.delta_ids,
      codes=self.delta_codes,
      names_utf8=names_utf8,
      names_offsets=names_offsets,
      captions_utf8=captions_utf8,
      captions_offsets=captions_offsets,
    )
    if self.delta_embeddings is not None:
      arrays["embeddings"] = self.delta_embeddings
    io.write_npz(os.path.join(target, "delta.npz"), **arrays)
    io.write_npz(os.path.join(target, "removed.npz"), removed=self.removed)
    files = {
      name: _file_record(os.path.join(target, name)) for name in ("delta.npz", "removed.npz")
    }
    if os.environ.get(PAUSE_ENV):
      print(f"live index: v{version} written, switching in {os.environ[PAUSE_ENV]} s", flush=True)
      time.sleep(float(os.environ[PAUSE_ENV]))
    record = {"format": CURRENT_FORMAT, "version": version, "parent": self.version, "files": files}
    io.write_json(os.path.join(folder, CURRENT), _seal(record), sort_keys=True)  # the switch
    io.write_text(os.path.join(target, COMMITTED), f"{version}\n")
    previous, self.version = self.version, version
    # Committed versions older than the previous one, and folders of writers that died
    # before their switch (never committed), go; the previous one stays for a reader that
    # read CURRENT just before the switch.
    for n in on_disk:
      stale = os.path.join(folder, f"v{n}")
      if n < previous or (n > previous and not os.path.exists(os.path.join(stale, COMMITTED))):
        shutil.rmtree(stale, ignore_errors=True)

  def _read_current(self, folder: str) -> dict | None:
    """CURRENT's record, checked (module doc); None when the index never changed."""
    path = os.path.join(folder, CURRENT)
    committed = [
      n for n in _versions(folder) if os.path.exists(os.path.join(folder, f"v{n}", COMMITTED))
    ]
    if not os.path.exists(path):
      if committed:
        raise LiveIndexDamaged(
          f"{path} is missing but version {committed[-1]} was committed; "
          f"restore it (or remove {folder} to serve the export as "
          f"exported)"
        )
      return None
    try:
      with open(path, encoding="utf-8") as f:
        record = json.load(f)
      version = record["version"]
      if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version {version!r} is not a positive integer")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise LiveIndexDamaged(
        f"{path}: unreadable ({type(e).__name__}: {e}); restore it (or "
        f"remove {folder} to serve the export as exported)"
      ) from e
    sealed = "checksum" in record
    if sealed and _seal({k: v for k, v in record.items() if k != "checksum"}) != record:
      raise LiveIndexDamaged(
        f"{path} does not match its checksum (changed by hand?); restore "
        f"it (or remove {folder} to serve the export as exported)"
      )
    if not sealed and os.path.exists(os.path.join(folder, f"v{version}", COMMITTED)):
      raise LiveIndexDamaged(
        f"{path} has no checksum but names version {version}, written "
        f"with one (changed by hand?); restore it"
      )
    newer = [n for n in committed if n > version]
    if newer:
      raise LiveIndexDamaged(
        f"{path} names version {version} but version {newer[-1]} was "
        f"committed after it (an old CURRENT restored or edited?): "
        f"serving it would drop later changes; restore CURRENT, or "
        f"remove {folder}/v{newer[-1]} to go back on purpose"
      )
    for name, want in (record.get("files") or {}).items():
      file_path = os.path.join(folder, f"v{version}", name)
      if not os.path.exists(file_path):
        raise LiveIndexDamaged(f"{file_path} is missing (CURRENT names it)")
      got = _file_record(file_path)
      if got != want:
        what = (
          "has {} bytes, {} were written".format(got["size"], want.get("size"))
          if got["size"] != want.get("size")
          else "does not match its checksum (changed since it was written)"
        )
        raise LiveIndexDamaged(f"{file_path} {what}")
    return record

  def load_changes(self, export_dir: str) -> None:
    """Reads the version CURRENT names (nothing when the index never changed); a damaged or
    hand-edited live index is a `LiveIndexDamaged` naming what differs."""
    folder = os.path.join(export_dir, FOLDER)
    record = self._read_current(folder)
    if record is None:
      return
    version = int(record["version"])
    target = os.path.join(folder, f"v{version}")
    delta_path = os.path.join(target, "delta.npz")
    try:
      with np.load(delta_path) as f:
        present = set(f.files)
      if "layout" in present:
        f = io.read_npz(
          delta_path,
          (
            "layout",
            "image_ids",
            "codes",
            "names_utf8",
            "names_offsets",
            "captions_utf8",
            "captions_offsets",
          )
          + (("embeddings",) if "embeddings" in present else ()),
        )
        if int(f["layout"]) != LAYOUT:
          raise ValueError(f"layout {int(f['layout'])}, this avg-jax reads {LAYOUT}")
        names = _unpack(f["names_utf8"], f["names_offsets"])
        captions = [json.loads(c) for c in _unpack(f["captions_utf8"], f["captions_offsets"])]
      else:  # written before LAYOUT 2: fixed-width strings
        optional = tuple(k for k in ("embeddings", "captions") if k in present)
        f = io.read_npz(delta_path, ("image_ids", "codes", "file_names") + optional)
        names = [str(n) for n in f["file_names"].tolist()]
        captions = [
          json.loads(c)
          for c in np.asarray(f.get("captions", np.full(len(f["image_ids"]), "[]")), str)
          .reshape(-1)
          .tolist()
        ]
      ids, codes, emb = f["image_ids"], f["codes"], f.get("embeddings")
      removed = io.read_npz(os.path.join(target, "removed.npz"), ("removed",))["removed"]
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, UserError) as e:
      raise LiveIndexDamaged(f"{folder}: damaged live index ({type(e).__name__}: {e})") from e
    if (
      codes.ndim != 2
      or codes.shape[1] != len(self.position_sizes)
      or len(ids) != len(codes)
      or len(names) != len(ids)
      or len(captions) != len(ids)
    ):
      raise LiveIndexDamaged(
        f"{target}/delta.npz: codes of shape {list(codes.shape)}, "
        f"{len(names)} names and {len(captions)} caption lists for "
        f"{len(ids)} images do not fit this export's identifiers"
      )
    self.delta_ids, self.delta_codes = ids.astype(np.int64), codes.astype(np.int32)
    self.delta_names = names
    self.delta_captions = [[str(c) for c in row] for row in captions]
    if self.delta_embeddings is not None:
      if emb is None:
        raise LiveIndexDamaged(f"{target}/delta.npz: no embeddings for the added images")
      self.delta_embeddings = emb.astype(np.float32)
    self.removed = removed.astype(np.int64)
    self.version = version
