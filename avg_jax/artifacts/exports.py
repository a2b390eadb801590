"""The export stage's hand-over: the serving checkpoint's folder and its manifest.

    <export>/manifest.json         format version, avg-jax version, scheme, source stage, T5 and
                                   voken-vocabulary configs, decode settings, query limits
                                   (written last: a folder without it is not an export)
    <export>/params/               orbax checkpoint of the generator's parameters (no optimizer)
    <export>/trie.npz              prefix tree over the indexed images (VokenTrie.save)
    <export>/voken_table.npz       image_ids int64[N], codes int32[N, P], file_names str[N]
    <export>/text_tokenizer.model  the SentencePiece model
    <export>/config.json           the full training config, for the record
    <export>/dual_encoder/         the dual encoder (avg_jax/encoders/store.py), for avg / rq
                                   (live adds embed images with it) and with
                                   `decode.tie_break="similarity"`, which also stores
                                   image_embeddings.npz (image_ids, image_emb) of the indexed
                                   images
    <export>/image_tokenizer/      avg / rq: the frozen RQ tokenizer (rqvae.json, rqvae.npz) that
                                   gives added images their codes; with dual_encoder/ and the
                                   manifest's "live" key the index can grow
                                   (avg_jax/inference/live_index.py)
    <export>/query_head.npz        avg_hybrid with `decode.hybrid_query="generator"`: the linear
                                   head that predicts query embeddings from the generator's
                                   encoder (avg_jax/models/query_head.py)
    <export>/live/                 images added / removed since export (inference/live_index.py)
    <export>/gallery/              optional: thumbnails and captions (avg_jax/inference/gallery.py)

What is written and read here is plain data; avg_jax/export/writer.py composes the folder
(`write_export`) and avg_jax/inference/retriever.py loads it (`Retriever.load`).
"""

import os

import numpy as np

from avg_jax.artifacts import io
from avg_jax.errors import UserError

FORMAT = "avg-jax-serving"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params"
TRIE = "trie.npz"
TABLE = "voken_table.npz"
TOKENIZER = "text_tokenizer.model"
CONFIG = "config.json"
DUAL_ENCODER = "dual_encoder"
IMAGE_EMBEDDINGS = "image_embeddings.npz"
IMAGE_TOKENIZER = "image_tokenizer"
QUERY_HEAD = "query_head.npz"
_REQUIRED = ("t5", "vocab", "decode", "limits", "scheme")


def write_manifest(folder: str, manifest: dict) -> None:
  """Writes the manifest (add it last: it marks the folder an export)."""
  io.write_json(
    os.path.join(folder, MANIFEST),
    dict(manifest, format=FORMAT, format_version=FORMAT_VERSION),
    sort_keys=True,
  )


def read_manifest(directory: str) -> dict:
  """The manifest of the export in `directory`, checked (`UserError` naming the problem)."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise UserError(f"not an avg-jax serving checkpoint (no {MANIFEST}): {directory}")
  manifest = io.read_json(path)
  if manifest is None:
    raise UserError(f"{path}: malformed JSON")
  if manifest.get("format") != FORMAT:
    raise UserError(f"{path}: not an avg-jax serving manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise UserError(
      f"{path}: format version {manifest.get('format_version')}, this avg-jax "
      f"reads {FORMAT_VERSION}"
    )
  for key in _REQUIRED:
    if key not in manifest:
      raise UserError(f"{path}: missing key {key!r}")
  return manifest


def write_table(folder: str, image_ids, codes, file_names) -> None:
  io.write_npz(
    os.path.join(folder, TABLE),
    image_ids=np.asarray(image_ids, np.int64),
    codes=np.asarray(codes, np.int32),
    file_names=np.asarray(list(file_names), str),
  )


def read_table(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """`(image ids int64[N], file names str[N])` of the indexed images."""
  path = os.path.join(directory, TABLE)
  t = io.read_npz(path, ("image_ids", "file_names"))
  return t["image_ids"], t["file_names"]


def write_image_embeddings(folder: str, image_ids, image_emb) -> None:
  io.write_npz(
    os.path.join(folder, DUAL_ENCODER, IMAGE_EMBEDDINGS),
    image_ids=np.asarray(image_ids, np.int64),
    image_emb=np.asarray(image_emb, np.float32),
  )


def read_image_embeddings(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """`(image ids int64[N], image_emb float32[N, D])` of an export that orders shared codes by
  similarity."""
  path = os.path.join(directory, DUAL_ENCODER, IMAGE_EMBEDDINGS)
  if not os.path.isfile(path):
    raise UserError(
      f"serving checkpoint {directory} orders shared codes by similarity but "
      f"has no {DUAL_ENCODER}/{IMAGE_EMBEDDINGS}; export it again"
    )
  f = io.read_npz(path, ("image_ids", "image_emb"), remedy="export again")
  return f["image_ids"].astype(np.int64), f["image_emb"].astype(np.float32)
