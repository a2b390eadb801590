"""Feature extraction, cut into shards that processes share and reruns skip.

Each split's images are cut into shards of `encoder_train.embed_images_per_shard`
(`avg_jax.data.shards`); a shard holds images `[a, b)` and their captions `[a*C, b*C)`
(caption_source order). Process p of n embeds shards p, p+n, ... on its own devices (a local
mesh: the rows of one shard need nothing from other processes), streaming them through grain
in fixed-size batches into `<workdir>/embed/shards/<split>-<a>-<b>.npz` (NpzWriter: memmaps,
then an atomic rename; the range is in the name). A shard file that reads back whole (zip
CRC-32 of every array) with the right shapes is done; a damaged one is written again with a
warning. Process 0 then merges a split's shards into `embeddings_<split>.npz`, one shard in
memory at a time.

Rows do not depend on which batch or shard they were computed in (the encoders treat rows
independently, and on the same devices every call has the same shapes), so the merged file
equals a one-shard run bit for bit (checked on CPU: tests/encoders/test_encoders_shards.py);
with another per-device batch (e.g. 2 processes x 4 devices instead of 1 x 8: each process
takes `embed_batch_size` rows per call) XLA may order sums differently: equal to a relative
1e-6 (tests/test_multiprocess.py).
"""

import dataclasses
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from avg_jax import partitioning, processes
from avg_jax.artifacts import embeddings, paths
from avg_jax.artifacts.npz_writer import NpzWriter
from avg_jax.data import dataset, pipeline
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.data import shards as shards_lib
from avg_jax.encoders import clip, preprocess
from avg_jax.encoders.train import Tokenize
from avg_jax.errors import UserError
from avg_jax.progress import progress

log = logging.getLogger(__name__)

SHARD_KEY = "encoder_train.embed_images_per_shard"


@dataclasses.dataclass
class DualEncoder:
  """A ready-to-use encoder: config, (sharded) params, preprocessing and text tokenizer."""

  cfg: clip.ClipConfig
  params: Any
  preprocess: preprocess.PreprocessConfig
  tokenizer: Any  # encode_batch(texts, max_length) -> int32[B, max_length]
  param_shardings: Any
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False)

  def image_fn(self, mesh: Mesh):
    """Jitted `uint8[B, H, W, 3] -> float32[B, D]` (replicated output), built once per mesh."""
    if ("image", mesh) not in self._jitted:
      pre = self.preprocess
      self._jitted["image", mesh] = _jit(
        _encode_images,
        (self.cfg, tuple(pre.mean), tuple(pre.std)),
        mesh,
        self.param_shardings,
        partitioning.logical_sharding(mesh, "batch", None, None, None),
      )
    return self._jitted["image", mesh]

  def text_fn(self, mesh: Mesh):
    """Jitted `int32[B, L] -> float32[B, D]` (replicated output), built once per mesh."""
    if ("text", mesh) not in self._jitted:
      self._jitted["text", mesh] = _jit(
        _encode_texts,
        (self.cfg,),
        mesh,
        self.param_shardings,
        partitioning.logical_sharding(mesh, "batch", None),
      )
    return self._jitted["text", mesh]

  def encode_texts(self, texts: list[str], mesh: Mesh) -> np.ndarray:
    """Convenience for a handful of texts: `float32[len(texts), D]`."""
    tokens = self.tokenizer.encode_batch(texts, self.cfg.max_text_length)
    rows = _round_up(len(texts), _data_shards(mesh))
    return _run(self.text_fn(mesh), self.params, tokens, rows, mesh)

  def encode_text_batches(
    self, texts: list[str], mesh: Mesh, batch_size: int, desc: str = "embed texts"
  ) -> np.ndarray:
    """`float32[len(texts), D]` in fixed-size batches (one compilation, bounded memory)."""
    rows = _round_up(max(1, batch_size), _data_shards(mesh))
    out = [np.zeros((0, self.cfg.projection_dim), np.float32)]
    for start in progress(
      range(0, len(texts), rows), total=-(-len(texts) // rows), desc=desc, unit="batch"
    ):
      tokens = self.tokenizer.encode_batch(texts[start : start + rows], self.cfg.max_text_length)
      out.append(_run(self.text_fn(mesh), self.params, tokens, rows, mesh))
    return np.concatenate(out).astype(np.float32)

  def encode_images(self, images: np.ndarray, mesh: Mesh, batch_size: int) -> np.ndarray:
    """`uint8[N, S, S, 3]` (already `preprocess.resize_and_crop`ped) -> `float32[N, D]`, in
    fixed-size batches (one compilation)."""
    rows = _round_up(max(1, batch_size), _data_shards(mesh))
    out = [np.zeros((0, self.cfg.projection_dim), np.float32)]
    for start in range(0, len(images), rows):
      out.append(
        _run(
          self.image_fn(mesh),
          self.params,
          np.asarray(images[start : start + rows], np.uint8),
          rows,
          mesh,
        )
      )
    return np.concatenate(out).astype(np.float32)


def _encode_images(cfg: clip.ClipConfig, mean: tuple, std: tuple, params, images):
  return clip.encode_images(params, cfg, preprocess.normalize(images, mean, std))


def _encode_texts(cfg: clip.ClipConfig, params, tokens):
  return clip.encode_texts(params, cfg, tokens)


def _jit(fn, static: tuple, mesh, param_shardings, input_sharding):
  """`run(params, x)` = module-level `fn(*static, params, x)` jitted on `mesh`: encoders with
  equal configs (every `Retriever.load` of an export builds one) share one compile."""
  jitted = jax.jit(
    fn,
    static_argnums=tuple(range(len(static))),
    in_shardings=(param_shardings, input_sharding),
    out_shardings=partitioning.replicated(mesh),
  )

  def run(params, x):
    with partitioning.activation_context(mesh):
      return jitted(*static, params, x)

  return run


def _data_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _run(fn, params, host_batch: np.ndarray, rows: int, mesh: Mesh) -> np.ndarray:
  """Pads `host_batch` to `rows` (fixed shapes: one compilation), runs `fn`, trims.

  Every process of `mesh` holds the whole batch and places its own devices' slices, so the
  row order of the output is the input order (feature extraction uses a one-process mesh)."""
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
    return {
      "image": preprocess.resize_and_crop(element["image"], self.pre),
      "image_id": np.int64(element["image_id"]),
    }


class DropCaptionIndex:
  def __call__(self, element: dict) -> dict:
    return {"image_id": element["image_id"], "caption": element["caption"]}


# --- Shards --------------------------------------------------------------------------------------


def plan(workdir: str, splits: Sequence[str], images_per_shard: int) -> list[shards_lib.Shard]:
  """The shards of `splits` (image ranges; boundaries from the split sizes alone)."""
  info = dataset.load_info(workdir)
  sizes = {split: int(info["splits"][split]["num_images"]) for split in splits}
  return shards_lib.plan(sizes, int(images_per_shard), SHARD_KEY)


def shard_file(workdir: str, shard: shards_lib.Shard) -> str:
  return os.path.join(paths.embed_shards_dir(workdir), f"{shard.name}.npz")


def _shard_arrays(shard: shards_lib.Shard, captions_per_image: int, dim: int) -> dict:
  """`embeddings.arrays` for a shard's rows."""
  return embeddings.arrays(len(shard), len(shard) * captions_per_image, dim)


def read_shard(
  path: str, shard: shards_lib.Shard, captions_per_image: int, dim: int
) -> tuple[dict | None, str]:
  """`(arrays, "")` for a whole, well-formed shard file; `(None, why)` otherwise (`why` is ""
  when the file does not exist). Reading every array to its end checks its zip CRC-32."""
  if not os.path.exists(path):
    return None, ""
  try:
    with np.load(path) as f:
      arrays = {k: f[k] for k in embeddings.KEYS}
  except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    return None, f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())})"
  for name, (dtype, shape) in _shard_arrays(shard, captions_per_image, dim).items():
    if arrays[name].dtype != dtype or arrays[name].shape != shape:
      return None, (
        f"has {name} {arrays[name].dtype}{list(arrays[name].shape)}, expected "
        f"{np.dtype(dtype)}{list(shape)}"
      )
  return arrays, ""


def write_shard(
  encoder: DualEncoder,
  images: Any,
  captions: Any,
  shard: shards_lib.Shard,
  mesh: Mesh,
  config: ml_collections.ConfigDict,
  path: str,
) -> None:
  """Embeds images `[a, b)` of `images` and captions `[a*C, b*C)` of `captions` (the split's
  sources) on `mesh` into `path`, atomically."""
  c = len(captions) // len(images)
  batch_size = int(config.encoder_train.embed_batch_size)
  rows = _round_up(batch_size, _data_shards(mesh))

  def batches(source, **kwargs):
    # Only this shard's rows, in order, all read by this process.
    return pipeline.from_config(
      source,
      batch_size,
      config.loader,
      shuffle=False,
      num_epochs=1,
      drop_remainder=False,
      shard_by_process=False,
      **kwargs,
    )

  arrays = _shard_arrays(shard, c, encoder.cfg.projection_dim)
  with NpzWriter(path, arrays) as writer:
    image_fn, start = encoder.image_fn(mesh), 0
    for batch in progress(
      batches(images[shard.start : shard.stop], map_fn=PrepareImage(encoder.preprocess)),
      total=-(-len(shard) // batch_size),
      desc=f"embed: {shard.name} images",
      unit="batch",
    ):
      emb = _run(image_fn, encoder.params, batch["image"], rows, mesh)
      writer["image_ids"][start : start + len(emb)] = batch["image_id"]
      writer["image_emb"][start : start + len(emb)] = emb
      start += len(emb)
    if start != len(shard):
      raise AssertionError(f"{shard.name}: read {start} images, expected {len(shard)}")
    text_fn, start = encoder.text_fn(mesh), 0
    tokenize = Tokenize(encoder.tokenizer, encoder.cfg.max_text_length)
    for batch in progress(
      batches(
        captions[shard.start * c : shard.stop * c], map_fn=DropCaptionIndex(), batch_map_fn=tokenize
      ),
      total=-(-len(shard) * c // batch_size),
      desc=f"embed: {shard.name} captions",
      unit="batch",
    ):
      emb = _run(text_fn, encoder.params, batch["tokens"], rows, mesh)
      writer["caption_image_ids"][start : start + len(emb)] = batch["image_id"]
      writer["caption_emb"][start : start + len(emb)] = emb
      start += len(emb)
    if start != len(shard) * c:
      raise AssertionError(f"{shard.name}: read {start} captions, expected {len(shard) * c}")


def write_shards(
  encoder: DualEncoder,
  workdir: str,
  splits: Sequence[str],
  mesh: Mesh,
  config: ml_collections.ConfigDict,
  process_index: int,
  process_count: int,
) -> dict[str, tuple[int, int, int]]:
  """Writes this process's shards of `splits` that are not done yet, on `mesh` (this process's
  devices). Prints one line per split; -> `{split: (shards, skipped, written)}` counted over
  this process's shards."""
  info = dataset.load_info(workdir)
  c, dim = int(info["captions_per_image"]), encoder.cfg.projection_dim
  counts = {split: [0, 0, 0] for split in splits}
  sources = {}
  mine = shards_lib.assigned(
    plan(workdir, splits, config.encoder_train.embed_images_per_shard), process_index, process_count
  )
  for shard in mine:
    counts[shard.split][0] += 1
    path = shard_file(workdir, shard)
    arrays, problem = read_shard(path, shard, c, dim)
    if arrays is not None:
      counts[shard.split][1] += 1
      continue
    if problem:
      print(f"warning: embed shard {path} {problem}; writing it again")
    if shard.split not in sources:  # one split's sources at a time
      sources = {
        shard.split: (
          dataset.image_source(workdir, shard.split),
          dataset.caption_source(workdir, shard.split),
        )
      }
    write_shard(encoder, *sources[shard.split], shard, mesh, config, path)
    counts[shard.split][2] += 1
  return shards_lib.report("embed", counts, process_index, process_count)


def merge_shards(workdir: str, split: str, config: ml_collections.ConfigDict, dim: int) -> str:
  """Writes `embeddings_<split>.npz` from the split's finished shards (one in memory at a
  time), then removes them; -> its path. Run once, after every shard is written."""
  info = dataset.load_info(workdir)
  c = int(info["captions_per_image"])
  n, m = int(info["splits"][split]["num_images"]), int(info["splits"][split]["num_captions"])
  path = paths.embeddings_file(workdir, split)
  arrays = embeddings.arrays(n, m, dim)
  shards = plan(workdir, [split], config.encoder_train.embed_images_per_shard)
  with NpzWriter(path, arrays) as writer:
    for shard in shards:
      rows, problem = read_shard(shard_file(workdir, shard), shard, c, dim)
      if rows is None:
        raise UserError(
          f"embed shard {shard_file(workdir, shard)} {problem or 'is missing'} "
          "after every process finished (is the workdir on storage that all "
          "hosts share?)"
        )
      for name in ("image_ids", "image_emb"):
        writer[name][shard.start : shard.stop] = rows[name]
      for name in ("caption_image_ids", "caption_emb"):
        writer[name][shard.start * c : shard.stop * c] = rows[name]
  embeddings.record(workdir, path)
  for shard in shards:
    os.remove(shard_file(workdir, shard))
  return path


def extract_splits(
  config: ml_collections.ConfigDict,
  workdir: str,
  encoder: DualEncoder,
  local: tuple[DualEncoder, Mesh],
  splits: Sequence[str],
  fresh: bool,
) -> tuple[np.ndarray, float]:
  """Writes `embeddings_<split>.npz` of `splits`: every process its shards with `local` (the
  encoder on its own devices), then process 0 merges them (the others wait, see
  avg_jax.processes). `fresh`: shards of an earlier encoder are removed first. -> (`int64
  [splits, 3]` shards / skipped / written summed over processes, seconds)."""
  index, count = jax.process_index(), jax.process_count()
  shards_dir = paths.embed_shards_dir(workdir)
  if fresh:  # shards left by an earlier encoder hold its rows, not this one's
    if index == 0:
      shutil.rmtree(shards_dir, ignore_errors=True)
    processes.barrier("embed: stale shards removed")
  t0 = time.perf_counter()
  mine, mesh = local
  counts = write_shards(mine, workdir, splits, mesh, config, index, count)
  # A collective: once it returns, every process has written its shards.
  totals = processes.sum_over_processes(np.array([counts[s] for s in splits]))
  error = None
  if index == 0:
    try:
      for split in splits:
        path = merge_shards(workdir, split, config, encoder.cfg.projection_dim)
        log.info("embed: wrote %s", path)
      shutil.rmtree(shards_dir, ignore_errors=True)
    except Exception as e:  # pylint: disable=broad-except (re-raised below, after telling
      error = e  # the other processes, which would otherwise wait forever)
  if not processes.process_0_succeeded(error is None):
    if error is not None:
      raise error
    raise UserError("embed: merging the shards failed in process 0 (see its error)")
  return totals, time.perf_counter() - t0


def embed_pseudo_queries(
  config: ml_collections.ConfigDict, workdir: str, encoder: DualEncoder, mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
  """`(image ids int64[Q], query_emb float32[Q, D])` of the prepared pseudo queries of the
  indexed (non-training) images, in file order (every process computes them)."""
  train_ids = dataset.read_texts(workdir, "train")[0]
  image_ids, queries = pseudo_lib.load(workdir)
  keep = ~np.isin(image_ids, train_ids)
  image_ids, queries = image_ids[keep], [q for q, k in zip(queries, keep) if k]
  emb = encoder.encode_text_batches(
    queries, mesh, int(config.encoder_train.embed_batch_size), desc="embed pseudo queries"
  )
  return image_ids, emb
