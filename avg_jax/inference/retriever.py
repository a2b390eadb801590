"""The serving checkpoint loaded by a `Retriever` in a few lines (avg_jax/export/writer.py
writes it).

The folder's layout and manifest: avg_jax/artifacts/exports.py.

    retriever = Retriever.load("runs/smoke/export")
    ids, scores = retriever.search(["a red circle above a blue square"], k=10)

Queries: `str` (or UTF-8 `bytes`); an empty or whitespace-only query, bytes that are not UTF-8
and a query longer than `max_query_chars` characters are `UserError`s naming the query's
position. Queries that tokenize to more than `max_length - 1` tokens are truncated (EOS
kept), as in training. Batches are padded to the smallest configured bucket that fits (larger
batches are split), so each (bucket, k) compiles once.

The live index (avg / rq exports): `retriever.add(images)` / `retriever.remove(ids)` change
the indexed images without retraining (live_index.py: versions under `<export>/live`);
`Retriever.load` reads the current version. After a change the search tree has new shapes, so
each (bucket, k) compiles once more.
"""

import copy
import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import avg_jax
from avg_jax import partitioning, runtime
from avg_jax.artifacts import checksums, exports, io
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import VokenTrie
from avg_jax.encoders import store
from avg_jax.errors import UserError
from avg_jax.inference import gallery as gallery_lib
from avg_jax.inference import image_tokenizer as image_tokenizer_lib
from avg_jax.inference import live_index as live_lib
from avg_jax.inference import new_images
from avg_jax.models import query_head as query_head_lib
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.progress import progress
from avg_jax.vokens import VokenVocabulary

log = logging.getLogger(__name__)


def check_files(directory: str, *, require_checksums: bool = True) -> None:
  """Every part of the export is present, has the bytes it was written with, and the small
  parts parse (`UserError` otherwise). Reads every file once (see avg_jax/artifacts/
  checksums.py for the cost). An export without `checksums.json` (written by an older
  avg-jax) is an error unless `require_checksums` is False (then it is loaded unverified,
  with a warning)."""
  for name in (exports.PARAMS, exports.TRIE, exports.TABLE, exports.TOKENIZER):
    if not os.path.exists(os.path.join(directory, name)):
      raise UserError(f"serving checkpoint {directory} is missing {name}; export again")
  if checksums.has_record(directory) or require_checksums:
    problem = checksums.verify(directory)
    if problem:
      raise UserError(f"damaged export: {problem}; export again")
  else:
    log.warning(
      "%s has no %s (exported by an older avg-jax): its files are not verified; "
      "export again to add it",
      directory,
      checksums.NAME,
    )
  try:
    VokenTrie.load(os.path.join(directory, exports.TRIE))
    TextTokenizer.load(os.path.join(directory, exports.TOKENIZER))
    exports.read_table(directory)
  except UserError as e:
    raise UserError(f"{e}; export again") from e


def _one_device_mesh():
  return partitioning.make_mesh({"data": 1}, jax.devices()[:1])


def _check_section(path: str, manifest: dict, section: str, cls) -> None:
  """`manifest[section]` holds only fields of the dataclass `cls` and all its required ones;
  else a `UserError` naming the key (a newer or hand-edited export)."""
  value = manifest.get(section)
  if not isinstance(value, dict):
    raise UserError(f"{path}: key {section!r} must be an object")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(value) - set(fields))
  if unknown:
    raise UserError(
      f"{path}: unknown key {section}.{unknown[0]} (not a setting of this "
      f"avg-jax {avg_jax.__version__}: an export written by another version, or "
      f"edited? export again)"
    )
  missing = [
    n
    for n, f in fields.items()
    if n not in value
    and f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING
  ]
  if missing:
    raise UserError(f"{path}: missing key {section}.{missing[0]}; export again")


def check_manifest(directory: str) -> dict:
  """The export's manifest, with every section a `Retriever` builds from checked (keys,
  then values), so a bad one is one line before anything is loaded; -> the manifest."""
  manifest = exports.read_manifest(directory)
  path = os.path.join(directory, exports.MANIFEST)
  _check_section(path, manifest, "t5", T5Config)
  _check_section(path, manifest, "vocab", VokenVocabulary)
  limits = manifest.get("limits")
  if not isinstance(limits, dict):
    raise UserError(f"{path}: key 'limits' must be an object")
  for key in ("max_length", "max_query_chars", "batch_buckets"):
    if key not in limits:
      raise UserError(f"{path}: missing key limits.{key}; export again")
  try:
    T5Config(**manifest["t5"])
    VokenVocabulary.from_dict(manifest["vocab"])
    DecodeConfig.from_dict(manifest["decode"])
    int(limits["max_length"]), int(limits["max_query_chars"])
    [int(b) for b in limits["batch_buckets"]]
  except UserError as e:
    raise UserError(f"{path}: {e}") from e
  except (TypeError, ValueError, AttributeError) as e:
    raise UserError(f"{path}: bad value ({type(e).__name__}: {e}); export again") from e
  if manifest.get("param_dtype", "float32") not in ("float32", "bfloat16"):
    raise UserError(f"{path}: param_dtype {manifest['param_dtype']!r} is not float32 or bfloat16")
  return manifest


@dataclasses.dataclass(frozen=True)
class IndexState:
  """What one search reads, replaced whole after a change (a reader never sees half of one)."""

  live: live_lib.LiveIndex
  device_trie: Any  # DeviceTrie | UnionTrie
  image_ids: np.ndarray  # int64[N]: the images a search can return, ascending
  file_names: dict
  captions: dict  # captions given with added images


class Retriever:
  """Answers text queries with ranked image ids from an exported serving checkpoint; images
  can be added and removed without retraining (`add`, `remove`: avg / rq exports)."""

  def __init__(
    self,
    *,
    params: Any,
    cfg: T5Config,
    vocab: VokenVocabulary,
    live: live_lib.LiveIndex,
    tokenizer: TextTokenizer,
    manifest: dict,
    directory: str = "",
    dual_encoder: Any = None,
    query_head: Any = None,
  ):
    self.params = params
    self.cfg = cfg
    self.vocab = vocab
    self.tokenizer = tokenizer
    self.manifest = manifest
    self.directory = directory
    # Keys an older manifest lacks get the behaviour it had (decoding/config.py's ADDED_KEYS);
    # trained_length then resolves to the vocabulary's P.
    decode = DecodeConfig.from_dict(manifest["decode"])
    self.trained_length = search_lib.trained_length_of(decode, vocab)
    self.decode = decode.for_generator(self.trained_length)
    self.max_length = int(manifest["limits"]["max_length"])
    self.max_query_chars = int(manifest["limits"]["max_query_chars"])
    self.buckets = tuple(sorted(int(b) for b in manifest["limits"]["batch_buckets"]))
    # The text tower runs per query unless avg_hybrid predicts the embedding (query_head).
    self.dual_encoder = dual_encoder if self.decode.needs_text_tower else None
    self.query_head = query_head if self.decode.uses_query_head else None
    if self.decode.uses_query_head and query_head is None:
      raise UserError(
        "Retriever: avg_hybrid with decode.hybrid_query='generator' needs the query head"
      )
    self._mesh = _one_device_mesh()
    self._image_encoder = dual_encoder
    self._image_tokenizer = None
    self.state = self._state(live)

  def _state(self, live: live_lib.LiveIndex) -> IndexState:
    return IndexState(
      live=live,
      device_trie=live.device(dense_levels=self.decode.dense_levels),
      image_ids=live.live_ids(),
      file_names=live.file_names(),
      captions=live.captions(),
    )

  @property
  def image_ids(self) -> np.ndarray:
    """int64[N]: the indexed images (base and added, minus removed), ascending."""
    return self.state.image_ids

  @property
  def beam_size(self) -> int:
    return self.decode.beam_size

  @classmethod
  def load(cls, directory: str, *, hybrid_weight: float | None = None) -> "Retriever":
    """Reads a folder written by `avg-jax export` and its live changes (the version
    `live/CURRENT` names); damaged files are `UserError`s.

    `hybrid_weight`: serve avg_hybrid with this fusion weight (instead of the export's own
    setting); the export must carry the dual encoder (`export.hybrid` or the similarity
    tie-break)."""
    # A service built on the Python API gets the process settings `avg-jax` applies.
    runtime.prefer_heap_allocations()
    manifest = check_manifest(directory)
    # Before the checksums: an export that never had the dual encoder (or lost it) gets this
    # message, not "damaged export".
    if hybrid_weight is not None:
      # avg / rq exports carry the encoder for live adds; avg_hybrid also needs the indexed
      # images' embeddings.
      if not os.path.isfile(
        os.path.join(directory, exports.DUAL_ENCODER, exports.IMAGE_EMBEDDINGS)
      ):
        raise UserError(
          f"serving checkpoint {directory} has no dual encoder for avg_hybrid; "
          f"export it with --config.export.hybrid=true"
        )
      decode = dataclasses.replace(
        DecodeConfig.from_dict(manifest["decode"]), hybrid_weight=float(hybrid_weight)
      )
      manifest = dict(manifest, decode=decode.to_dict())
    check_files(directory, require_checksums=False)
    cfg = T5Config(**manifest["t5"])
    vocab = VokenVocabulary.from_dict(manifest["vocab"])
    shapes = jax.eval_shape(lambda r: t5_lib.init_params(cfg, r), jax.random.key(0))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[manifest["param_dtype"]]
    # Restored onto this process's first device, whatever the device count of the run that
    # saved them (an export from 8 devices or a pod serves from one).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = partitioning.abstract(shapes, jax.tree.map(lambda _: device, shapes), dtype=dtype)
    params_dir = os.path.join(directory, exports.PARAMS)
    checkpointer = ocp.StandardCheckpointer()
    try:
      params = checkpointer.restore(os.path.abspath(params_dir), abstract)
    except Exception as e:
      raise UserError(f"{params_dir}: cannot restore parameters ({type(e).__name__})") from e
    finally:
      checkpointer.close()
    # Compute in the training dtype whatever the storage dtype.
    params = jax.tree.map(lambda x: x.astype(cfg.storage_dtype), params)
    trie = VokenTrie.load(os.path.join(directory, exports.TRIE))
    table = io.read_npz(
      os.path.join(directory, exports.TABLE), ("image_ids", "codes", "file_names")
    )
    tokenizer = TextTokenizer.load(os.path.join(directory, exports.TOKENIZER))
    dual_encoder, base_emb, query_head = None, None, None
    decode = DecodeConfig.from_dict(manifest["decode"])
    if decode.uses_query_head:
      path = os.path.join(directory, exports.QUERY_HEAD)
      if not os.path.isfile(path):
        raise UserError(
          f"serving checkpoint {directory} has no {exports.QUERY_HEAD} for "
          f"avg_hybrid with decode.hybrid_query='generator'; export it with "
          f"--config.export.hybrid=true"
        )
      query_head = query_head_lib.load(path, remedy="export again")
    if decode.needs_embeddings:
      emb_ids, emb = exports.read_image_embeddings(directory)
      row_of = {int(i): r for r, i in enumerate(emb_ids)}
      missing = [int(i) for i in table["image_ids"] if int(i) not in row_of]
      if missing:
        raise UserError(
          f"{directory}/{exports.DUAL_ENCODER}/{exports.IMAGE_EMBEDDINGS}: no "
          f"embedding for image {missing[0]}; export again"
        )
      base_emb = emb[[row_of[int(i)] for i in table["image_ids"]]]
      dual_encoder = store.load_encoder_dir(
        os.path.join(directory, exports.DUAL_ENCODER), _one_device_mesh(), stage_hint="export again"
      )
    live = live_lib.LiveIndex(
      base_ids=table["image_ids"],
      base_codes=table["codes"],
      base_names=table["file_names"],
      position_sizes=trie.position_sizes,
      num_levels=vocab.num_levels,
      base_embeddings=base_emb,
      base_trie=trie,
    )
    live.load_changes(directory)
    return cls(
      params=params,
      cfg=cfg,
      vocab=vocab,
      live=live,
      tokenizer=tokenizer,
      manifest=manifest,
      directory=directory,
      dual_encoder=dual_encoder,
      query_head=query_head,
    )

  # --- the live index ---------------------------------------------------------------------------
  def _live_spec(self) -> dict:
    spec = self.manifest.get("live")
    if spec is None:
      raise UserError(
        f"{self.directory}: this export cannot add images (scheme "
        f"{self.manifest.get('scheme')!r}; only avg / rq exports written by this "
        f"version carry the image encoder and tokenizer a new image needs)"
      )
    return spec

  def _adding_tools(self):
    """(image encoder, frozen RQ tokenizer), loaded on the first add."""
    if self._image_encoder is None:
      self._image_encoder = store.load_encoder_dir(
        os.path.join(self.directory, exports.DUAL_ENCODER), self._mesh, stage_hint="export again"
      )
    if self._image_tokenizer is None:
      self._image_tokenizer = image_tokenizer_lib.load(
        os.path.join(self.directory, exports.IMAGE_TOKENIZER)
      )
    return self._image_encoder, self._image_tokenizer

  def embed_images(
    self, images: Sequence[Any], batch_size: int = 64, progress_bar: bool = False
  ) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """`(embeddings float32[M, D], semantic codes int32[M, L], stored images)` of new images,
    computed as the embed and tokenize stages did; bad images are a `UserError` first."""
    spec = self._live_spec()
    new_images.check_all(images)
    encoder, tok = self._adding_tools()
    embs, stored = [np.zeros((0, encoder.cfg.projection_dim), np.float32)], []
    starts: Iterable[int] = range(0, len(images), batch_size)
    if progress_bar:
      starts = progress(
        starts, total=-(-len(images) // batch_size), desc="add images", unit="batch"
      )
    for start in starts:
      crops = []
      for image in images[start : start + batch_size]:
        crop, data = new_images.encoder_input(
          image,
          image_size=int(spec["image_size"]),
          encoding=str(spec["image_encoding"]),
          jpeg_quality=int(spec["jpeg_quality"]),
          pre=encoder.preprocess,
        )
        crops.append(crop)
        stored.append(data)
      embs.append(encoder.encode_images(np.stack(crops), self._mesh, batch_size))
    emb = np.concatenate(embs)
    return emb, tok.codes(emb), stored

  def add(
    self,
    images: Sequence[Any],
    *,
    ids: Sequence[int] | None = None,
    captions: Sequence[Sequence[str]] | None = None,
    file_names: Sequence[str] | None = None,
    progress_bar: bool = False,
  ) -> np.ndarray:
    """Adds images (file paths, encoded bytes or PIL images) to the index; -> their ids
    (given, or the next free ones). Persisted (a new live version) before searches see them."""
    if isinstance(images, (str, bytes, os.PathLike)):
      raise UserError("add: pass a list of images, not a single one")
    images = list(images)
    if not images:
      raise UserError("add: no images")
    for name, values in (("ids", ids), ("captions", captions), ("file_names", file_names)):
      if values is not None and len(values) != len(images):
        raise UserError(f"add: {len(values)} {name} for {len(images)} images")
    if captions is not None and any(isinstance(c, str) for c in captions):
      raise UserError("add: captions: give a list of captions per image")
    names = (
      list(file_names)
      if file_names is not None
      else [new_images.file_name(image) for image in images]
    )
    for i, name in enumerate(names):  # before the images are embedded (seconds)
      live_lib.check_texts(name, captions[i] if captions is not None else [], f"add: image {i}")
    if ids is not None:
      bad = [
        i
        for i in ids
        if isinstance(i, bool)
        or not isinstance(i, (int, np.integer))
        or not 0 <= int(i) <= live_lib.MAX_ID
      ]
      if bad:
        raise UserError(
          f"add: image ids must be integers in [0, {live_lib.MAX_ID}], got {str(bad[0])[:40]!r}"
        )
    emb, semantic, stored = self.embed_images(images, progress_bar=progress_bar)
    with live_lib.WriteLock(self.directory):
      live = copy.copy(self.state.live)
      live.load_changes(self.directory)  # another process may have changed it meanwhile
      new_ids = (
        live.next_ids(len(images)) if ids is None else np.asarray([int(i) for i in ids], np.int64)
      )
      live.add(
        new_ids, semantic, names, emb if live.delta_embeddings is not None else None, captions
      )
      self._write_thumbnails(new_ids, stored)
      live.save(self.directory)
    self.state = self._state(live)  # one assignment: searches see all of it or none
    return new_ids

  def remove(self, image_ids: Sequence[int]) -> None:
    """Removes images (base or added) from search results, persisted; an id that is not
    indexed is a `UserError` naming it."""
    if isinstance(image_ids, (str, bytes)):
      raise UserError("remove: pass a list of image ids")
    try:
      ids = np.asarray([int(i) for i in image_ids], np.int64)
    except (TypeError, ValueError) as e:
      raise UserError(f"remove: image ids must be integers ({e})") from e
    if not len(ids):
      raise UserError("remove: no image ids")
    with live_lib.WriteLock(self.directory):
      live = copy.copy(self.state.live)
      live.load_changes(self.directory)
      live.remove(ids)  # on a copy: an unknown id leaves this Retriever as it was
      if not len(live.live_ids()):
        raise UserError("remove: the index would be empty (at least one image must stay)")
      live.save(self.directory)
    self.state = self._state(live)

  def reload_changes(self) -> bool:
    """Reads the newest live version written by another process; whether it changed."""
    live = copy.copy(self.state.live)
    live.load_changes(self.directory)
    if live.version == self.state.live.version:
      return False
    self.state = self._state(live)
    return True

  def _write_thumbnails(self, image_ids: np.ndarray, stored: list[bytes]) -> None:
    size = int(self._live_spec().get("thumbnail_size", 256))
    folder = os.path.join(self.directory, live_lib.FOLDER, live_lib.THUMBNAILS)
    os.makedirs(folder, exist_ok=True)
    for image_id, data in zip(image_ids, stored):
      thumb, _ = gallery_lib.thumbnail(data, size)
      if thumb:
        io.write_bytes(os.path.join(folder, str(int(image_id))), thumb)

  def live_thumbnail(self, image_id: int) -> tuple[bytes, str] | None:
    """`(bytes, MIME type)` of an added image's thumbnail, None when there is none."""
    if not np.isin(int(image_id), self.state.live.delta_ids):
      return None
    path = os.path.join(self.directory, live_lib.FOLDER, live_lib.THUMBNAILS, str(int(image_id)))
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError:
      return None
    return data, ("image/png" if data.startswith(b"\x89PNG") else "image/jpeg")

  def added_captions(self, image_id: int) -> list[str]:
    """The captions given with an added image ([] when none; the base's are in the
    export's gallery)."""
    return list(self.state.captions.get(int(image_id), []))

  def file_name(self, image_id: int) -> str:
    return self.state.file_names.get(int(image_id), "")

  def validate(self, queries: Sequence[str | bytes]) -> list[str]:
    """Checks and decodes queries (see the module docstring)."""
    if isinstance(queries, (str, bytes)):
      raise UserError("search: pass a list of queries, not a single string")
    out = []
    for i, q in enumerate(queries):
      if isinstance(q, bytes):
        try:
          q = q.decode("utf-8")
        except UnicodeDecodeError as e:
          raise UserError(f"query {i}: not valid UTF-8 (byte {e.start})") from e
      if not isinstance(q, str):
        raise UserError(f"query {i}: expected a string, got {type(q).__name__}")
      if not q.strip():
        raise UserError(f"query {i}: empty")
      if len(q) > self.max_query_chars:
        raise UserError(f"query {i}: {len(q)} characters, the limit is {self.max_query_chars}")
      out.append(q)
    if not out:
      raise UserError("search: no queries")
    return out

  def search(self, queries: Sequence[str | bytes], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """`(image ids int64[Q, k], scores float32[Q, k])`, best first; -1 / -inf fill slots
    when fewer than k images are reachable."""
    texts = self.validate(queries)
    state = self.state  # read once: a concurrent change swaps in a whole new one
    # Bounded by every image the index ever held (removal never shrinks it), so a compiled
    # program stays valid; slots beyond the reachable images are -1.
    limit = len(state.live.all_ids())
    if not 1 <= k <= limit:
      raise UserError(f"search: k must be in [1, {limit}], got {k}")
    decode = self.decode.with_k(k)
    tokens = self.tokenizer.encode_batch(texts, self.max_length)
    ids, scores = [], []
    largest = self.buckets[-1]
    for start in range(0, len(texts), largest):
      chunk = tokens[start : start + largest]
      bucket = next(b for b in self.buckets if b >= chunk.shape[0])
      padded = np.zeros((bucket, chunk.shape[1]), np.int32)
      padded[: chunk.shape[0]] = chunk
      padded[chunk.shape[0] :, 0] = 1  # EOS-only filler queries
      query_emb = None
      if self.dual_encoder is not None:
        chunk_texts = texts[start : start + largest]
        # Encoded as a full bucket (fillers repeat the first query): one compile per bucket,
        # never one per batch size (avg-jax serve compiles every bucket at start).
        filler = [chunk_texts[0]] * (bucket - len(chunk_texts))
        query_emb = np.asarray(
          self.dual_encoder.encode_texts(chunk_texts + filler, self._mesh), np.float32
        )
      result = search_lib.run_search(
        self.params,
        self.cfg,
        state.device_trie,
        self.vocab,
        padded,
        decode,
        query_emb=query_emb,
        query_head=self.query_head,
      )
      out = search_lib.results_to_numpy(result)
      ids.append(out["item_ids"][: chunk.shape[0]].astype(np.int64))
      scores.append(out["scores"][: chunk.shape[0]])
    return np.concatenate(ids), np.concatenate(scores)
