"""Feature extraction: stream a split through grain in fixed-size batches, encode on the mesh,
write rows into preallocated memmaps (memory does not grow with N), then rename into place."""

import contextlib
import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from avg_jax import paths, partitioning
from avg_jax.data import dataset, pipeline
from avg_jax.encoders import clip, preprocess
from avg_jax.encoders.npz_writer import NpzWriter
from avg_jax.encoders.train import Tokenize
from avg_jax.progress import progress


@dataclasses.dataclass
class DualEncoder:
  """A ready-to-use encoder: config, (sharded) params, preprocessing and text tokenizer."""
  cfg: clip.ClipConfig
  params: Any
  preprocess: preprocess.PreprocessConfig
  tokenizer: Any          # encode_batch(texts, max_length) -> int32[B, max_length]
  param_shardings: Any
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  def image_fn(self, mesh: Mesh):
    """Jitted `uint8[B, H, W, 3] -> float32[B, D]` (replicated output), built once per mesh."""
    cfg, pre = self.cfg, self.preprocess
    if ("image", mesh) not in self._jitted:
      fn = lambda params, images: clip.encode_images(
          params, cfg, preprocess.normalize(images, pre.mean, pre.std))
      self._jitted["image", mesh] = _jit(
          fn, mesh, self.param_shardings,
          partitioning.logical_sharding(mesh, "batch", None, None, None))
    return self._jitted["image", mesh]

  def text_fn(self, mesh: Mesh):
    """Jitted `int32[B, L] -> float32[B, D]` (replicated output), built once per mesh."""
    cfg = self.cfg
    if ("text", mesh) not in self._jitted:
      fn = lambda params, tokens: clip.encode_texts(params, cfg, tokens)
      self._jitted["text", mesh] = _jit(fn, mesh, self.param_shardings,
                                        partitioning.logical_sharding(mesh, "batch", None))
    return self._jitted["text", mesh]

  def encode_texts(self, texts: list[str], mesh: Mesh) -> np.ndarray:
    """Convenience for a handful of texts: `float32[len(texts), D]`."""
    tokens = self.tokenizer.encode_batch(texts, self.cfg.max_text_length)
    rows = _round_up(len(texts), _data_shards(mesh))
    return _run(self.text_fn(mesh), self.params, tokens, rows, mesh)


def _jit(fn, mesh, param_shardings, input_sharding):
  jitted = jax.jit(fn, in_shardings=(param_shardings, input_sharding),
                   out_shardings=partitioning.replicated(mesh))

  def run(params, x):
    with partitioning.activation_context(mesh):
      return jitted(params, x)

  return run


def _data_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _run(fn, params, host_batch: np.ndarray, rows: int, mesh: Mesh) -> np.ndarray:
  """Pads `host_batch` to `rows` (fixed shapes: one compilation), runs `fn`, trims.

  Every process holds the whole batch; each places its own devices' slices, so the row order
  of the output is the input order on any number of processes."""
  n = host_batch.shape[0]
  padded = np.zeros((rows,) + host_batch.shape[1:], host_batch.dtype)
  padded[:n] = host_batch
  names = ("batch",) + (None,) * (padded.ndim - 1)
  sharding = partitioning.logical_sharding(mesh, *names)
  placed = jax.make_array_from_callback(padded.shape, sharding, lambda idx: padded[idx])
  return np.asarray(fn(params, placed))[:n]


class PrepareImage:
  """Element -> `{"image": uint8[S, S, 3], "image_id": int64}` (picklable for grain workers)."""

  def __init__(self, pre: preprocess.PreprocessConfig):
    self.pre = pre

  def __call__(self, element: dict) -> dict:
    return {"image": preprocess.resize_and_crop(element["image"], self.pre),
            "image_id": np.int64(element["image_id"])}


class DropCaptionIndex:
  def __call__(self, element: dict) -> dict:
    return {"image_id": element["image_id"], "caption": element["caption"]}


def write_embeddings(encoder: DualEncoder, workdir: str, split: str, mesh: Mesh,
                     config: ml_collections.ConfigDict) -> str:
  """Writes `paths.embeddings_file(workdir, split)` (the embeddings contract); -> its path."""
  images = dataset.image_source(workdir, split)
  captions = dataset.caption_source(workdir, split)
  n, m, dim = len(images), len(captions), encoder.cfg.projection_dim
  batch_size = int(config.encoder_train.embed_batch_size)
  rows = _round_up(batch_size, _data_shards(mesh))
  path = paths.embeddings_file(workdir, split)
  arrays = {"image_ids": (np.int64, (n,)), "image_emb": (np.float32, (n, dim)),
            "caption_image_ids": (np.int64, (m,)), "caption_emb": (np.float32, (m, dim))}

  def batches(source, **kwargs):
    # Not sharded by process: every process reads every batch (see `_run`).
    return pipeline.from_config(source, batch_size, config.loader, shuffle=False,
                                num_epochs=1, drop_remainder=False, shard_by_process=False,
                                **kwargs)

  main = jax.process_index() == 0
  # Only process 0 writes; the others compute their share of every batch and discard rows.
  with (NpzWriter(path, arrays) if main else contextlib.nullcontext()) as writer:
    image_fn, start = encoder.image_fn(mesh), 0
    for batch in progress(batches(images, map_fn=PrepareImage(encoder.preprocess)),
                          total=-(-n // batch_size), desc=f"embed: {split} images", unit="batch"):
      emb = _run(image_fn, encoder.params, batch["image"], rows, mesh)
      if main:
        writer["image_ids"][start:start + len(emb)] = batch["image_id"]
        writer["image_emb"][start:start + len(emb)] = emb
      start += len(emb)
    if start != n:
      raise AssertionError(f"{split}: read {start} images, expected {n}")
    text_fn, start = encoder.text_fn(mesh), 0
    tokenize = Tokenize(encoder.tokenizer, encoder.cfg.max_text_length)
    for batch in progress(batches(captions, map_fn=DropCaptionIndex(), batch_map_fn=tokenize),
                          total=-(-m // batch_size), desc=f"embed: {split} captions",
                          unit="batch"):
      emb = _run(text_fn, encoder.params, batch["tokens"], rows, mesh)
      if main:
        writer["caption_image_ids"][start:start + len(emb)] = batch["image_id"]
        writer["caption_emb"][start:start + len(emb)] = emb
      start += len(emb)
    if start != m:
      raise AssertionError(f"{split}: read {start} captions, expected {m}")
  return path
