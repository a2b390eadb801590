"""The serving checkpoint: written by `write_export`, loaded by a `Retriever` in a few lines.

The folder's layout and manifest: avg_jax/artifacts/exports.py.

    retriever = Retriever.load("runs/smoke/export")
    ids, scores = retriever.search(["a red circle above a blue square"], k=10)

Queries: `str` (or UTF-8 `bytes`); an empty or whitespace-only query, bytes that are not UTF-8
and a query longer than `max_query_chars` characters are `UserError`s naming the query's
position. Queries that tokenize to more than `max_length - 1` tokens are truncated (EOS
kept), as in training. Batches are padded to the smallest configured bucket that fits (larger
batches are split), so each (bucket, k) compiles once.
"""

import dataclasses
import logging
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

import avg_jax
from avg_jax import partitioning, processes, runtime
from avg_jax.artifacts import checksums, exports, io
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import VokenTrie
from avg_jax.encoders import store
from avg_jax.errors import UserError
from avg_jax.export import gallery as gallery_lib
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import VokenVocabulary

log = logging.getLogger(__name__)


def write_export(directory: str, *, params: Any, cfg: T5Config, vocab: VokenVocabulary,
                 image_ids: np.ndarray, codes: np.ndarray, file_names: Sequence[str],
                 tokenizer: TextTokenizer, decode: dict, limits: dict, scheme: str,
                 source_stage: str, config: dict, config_hash: str = "",
                 param_dtype: str = "float32", gallery: tuple | None = None,
                 dual_encoder: tuple | None = None) -> None:
  """Writes the serving checkpoint into `directory` atomically (temp folder, then rename).

  `decode`: `DecodeConfig.to_dict()` and the generator's trained_length. `limits`:
  max_length (tokens), max_query_chars, batch_buckets. `gallery`: optional `(entries,
  thumbnail_size)` for `gallery.write` (thumbnails and captions of the indexed images).
  `dual_encoder`: optional `(workdir, image ids [N], image embeddings [N, D])`: the workdir's
  dual encoder is copied in with the indexed images' embeddings. `codes [N, T]` are the
  identifiers the generator emits (T = `decode["trained_length"]`: all positions, or the
  semantic codes alone).
  """
  directory = os.path.abspath(directory)
  # One name every process knows: all of them join the orbax save into it.
  tmp = directory + ".tmp"
  writer = processes.is_main()  # every process joins the orbax save; one writes the rest
  if writer:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  processes.barrier("export: temp folder ready")
  try:
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[param_dtype]
    stored = jax.tree.map(lambda x: x.astype(dtype), params)
    checkpointer = ocp.StandardCheckpointer()
    try:
      checkpointer.save(os.path.join(tmp, exports.PARAMS), stored)
      checkpointer.wait_until_finished()
    finally:
      checkpointer.close()
    if writer:
      codes = np.asarray(codes)
      trie = VokenTrie.build(codes, image_ids,
                             position_sizes=vocab.position_sizes()[:codes.shape[1]])
      trie.save(os.path.join(tmp, exports.TRIE))
      exports.write_table(tmp, image_ids, codes, file_names)
      io.write_bytes(os.path.join(tmp, exports.TOKENIZER), tokenizer.model_proto)
      io.write_json(os.path.join(tmp, exports.CONFIG), config, sort_keys=True)
      if gallery is not None:
        gallery_lib.write(tmp, *gallery)
      if dual_encoder is not None:
        source, emb_ids, emb = dual_encoder
        store.copy_encoder(source, os.path.join(tmp, exports.DUAL_ENCODER))
        exports.write_image_embeddings(tmp, emb_ids, emb)
      exports.write_manifest(tmp, {
          "avg_jax_version": avg_jax.__version__, "scheme": scheme,
          "source_stage": source_stage, "param_dtype": param_dtype, "config_hash": config_hash,
          "num_images": int(len(image_ids)), "t5": dataclasses.asdict(cfg),
          "vocab": vocab.to_dict(), "decode": dict(decode), "limits": dict(limits),
      })
      checksums.write(tmp)  # last: the record of every file, manifest included
      io.replace_dir(tmp, directory)
  except BaseException as e:
    # Whatever stopped it (a full disk, Ctrl-C), the half-written folder goes: on a full
    # disk it holds the space the user must free.
    if writer:
      shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, Exception) and io.disk_full(e):
      raise UserError(f"export: no space left on device writing {directory}; free space and "
                      f"rerun") from e
    raise
  processes.barrier("export: written")


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
    log.warning("%s has no %s (exported by an older avg-jax): its files are not verified; "
                "export again to add it", directory, checksums.NAME)
  try:
    VokenTrie.load(os.path.join(directory, exports.TRIE))
    TextTokenizer.load(os.path.join(directory, exports.TOKENIZER))
    exports.read_table(directory)
  except UserError as e:
    raise UserError(f"{e}; export again") from e


def _one_device_mesh():
  return partitioning.make_mesh({"data": 1}, jax.devices()[:1])


class Retriever:
  """Answers text queries with ranked image ids from an exported serving checkpoint."""

  def __init__(self, *, params: Any, cfg: T5Config, vocab: VokenVocabulary, trie: VokenTrie,
               tokenizer: TextTokenizer, image_ids: np.ndarray, file_names: np.ndarray,
               manifest: dict, dual_encoder: Any = None,
               image_embeddings: tuple[np.ndarray, np.ndarray] | None = None):
    self.params = params
    self.cfg = cfg
    self.vocab = vocab
    self.tokenizer = tokenizer
    self.image_ids = image_ids
    self.file_names = file_names
    self.manifest = manifest
    d = manifest["decode"]
    self.decode = DecodeConfig.from_dict(d)
    self.max_length = int(manifest["limits"]["max_length"])
    self.max_query_chars = int(manifest["limits"]["max_query_chars"])
    self.buckets = tuple(sorted(int(b) for b in manifest["limits"]["batch_buckets"]))
    # Exports written before the key existed scored the learned disambiguation position.
    self.trained_length = int(d.get("trained_length", vocab.id_length))
    self.dual_encoder = dual_encoder if self.decode.needs_embeddings else None
    if self.dual_encoder is not None:
      self._mesh = _one_device_mesh()
    self.device_trie = trie.to_device(
        dense_levels=self.decode.dense_levels,
        item_embeddings=image_embeddings if self.dual_encoder is not None else None)
    self._file_name_of = {int(i): str(n) for i, n in zip(image_ids, file_names)}

  @property
  def beam_size(self) -> int:
    return self.decode.beam_size

  @classmethod
  def load(cls, directory: str, *, hybrid_weight: float | None = None) -> "Retriever":
    """Reads a folder written by `avg-jax export`; damaged files are `UserError`s.

    `hybrid_weight`: serve avg_hybrid with this fusion weight (instead of the export's own
    setting); the export must carry the dual encoder (`export.hybrid` or the similarity
    tie-break)."""
    # A service built on the Python API gets the process settings `avg-jax` applies.
    runtime.prefer_heap_allocations()
    manifest = exports.read_manifest(directory)
    check_files(directory, require_checksums=False)
    if hybrid_weight is not None:
      if not os.path.isdir(os.path.join(directory, exports.DUAL_ENCODER)):
        raise UserError(f"serving checkpoint {directory} has no dual encoder for avg_hybrid; "
                        f"export it with --config.export.hybrid=true")
      manifest = dict(manifest, decode=dict(manifest["decode"],
                                            hybrid_weight=float(hybrid_weight)))
    cfg = T5Config(**manifest["t5"])
    vocab = VokenVocabulary.from_dict(manifest["vocab"])
    shapes = jax.eval_shape(lambda r: t5_lib.init_params(cfg, r), jax.random.key(0))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[manifest["param_dtype"]]
    # Restored onto this process's first device, whatever the device count of the run that
    # saved them (an export from 8 devices or a pod serves from one).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = partitioning.abstract(shapes, jax.tree.map(lambda _: device, shapes),
                                     dtype=dtype)
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
    image_ids, file_names = exports.read_table(directory)
    tokenizer = TextTokenizer.load(os.path.join(directory, exports.TOKENIZER))
    dual_encoder, image_embeddings = None, None
    if DecodeConfig.from_dict(manifest["decode"]).needs_embeddings:
      image_embeddings = exports.read_image_embeddings(directory)
      dual_encoder = store.load_encoder_dir(os.path.join(directory, exports.DUAL_ENCODER),
                                            _one_device_mesh(), stage_hint="export again")
    return cls(params=params, cfg=cfg, vocab=vocab, trie=trie, tokenizer=tokenizer,
               image_ids=image_ids, file_names=file_names, manifest=manifest,
               dual_encoder=dual_encoder, image_embeddings=image_embeddings)

  def file_name(self, image_id: int) -> str:
    return self._file_name_of.get(int(image_id), "")

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

  def search(self, queries: Sequence[str | bytes], k: int = 10
             ) -> tuple[np.ndarray, np.ndarray]:
    """`(image ids int64[Q, k], scores float32[Q, k])`, best first; -1 / -inf fill slots
    when fewer than k images are reachable."""
    texts = self.validate(queries)
    if not 1 <= k <= len(self.image_ids):
      raise UserError(f"search: k must be in [1, {len(self.image_ids)}], got {k}")
    decode = self.decode.with_k(k)
    tokens = self.tokenizer.encode_batch(texts, self.max_length)
    ids, scores = [], []
    largest = self.buckets[-1]
    for start in range(0, len(texts), largest):
      chunk = tokens[start:start + largest]
      bucket = next(b for b in self.buckets if b >= chunk.shape[0])
      padded = np.zeros((bucket, chunk.shape[1]), np.int32)
      padded[:chunk.shape[0]] = chunk
      padded[chunk.shape[0]:, 0] = 1  # EOS-only filler queries
      query_emb = None
      if self.dual_encoder is not None:
        chunk_texts = texts[start:start + largest]
        # Encoded as a full bucket (fillers repeat the first query): one compile per bucket,
        # never one per batch size (avg-jax serve compiles every bucket at start).
        filler = [chunk_texts[0]] * (bucket - len(chunk_texts))
        query_emb = np.asarray(self.dual_encoder.encode_texts(chunk_texts + filler, self._mesh),
                               np.float32)
      result = search_lib.constrained_search(
          self.params, self.cfg, self.device_trie, self.vocab, padded,
          **decode.search_kwargs(), query_emb=query_emb, trained_length=self.trained_length)
      out = search_lib.results_to_numpy(result)
      ids.append(out["item_ids"][:chunk.shape[0]].astype(np.int64))
      scores.append(out["scores"][:chunk.shape[0]])
    return np.concatenate(ids), np.concatenate(scores)
