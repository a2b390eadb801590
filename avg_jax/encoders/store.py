"""The dual encoder as a saved artifact: built (imported or trained), saved, loaded, copied.

    <folder>/encoder/            orbax checkpoint of the encoder parameters
    <folder>/encoder.json        ClipConfig, preprocessing, text tokenizer (written last: marks
                                 the encoder complete)
    <folder>/clip_tokenizer/     a pretrained CLIP's vocab.json / merges.txt copy

`<folder>` is the embed stage's `paths.embed_dir(workdir)`, or a self-contained copy inside an
export (`copy_encoder`). The encoder is imported from `encoder.pretrained_path` (a Hugging Face
CLIP directory) when set, otherwise trained from scratch (avg_jax/encoders/train.py).
"""

import dataclasses
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from avg_jax import partitioning, processes
from avg_jax.artifacts import checkpoints, checksums, io, paths
from avg_jax.data import dataset
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.encoders import bpe, clip, extract, hf_import, preprocess
from avg_jax.encoders.train import train_encoder
from avg_jax.errors import UserError

log = logging.getLogger(__name__)

PARAMS = "encoder"
META = "encoder.json"


def encoder_files(workdir: str) -> tuple[str, str]:
  """(params checkpoint directory, encoder.json) of the embed stage's encoder."""
  directory = paths.embed_dir(workdir)
  return os.path.join(directory, PARAMS), os.path.join(directory, META)


def abstract_params(cfg: clip.ClipConfig) -> Any:
  """The encoder's parameter shapes, boxed with their logical axis names."""
  return jax.eval_shape(clip.init_fn(cfg), jax.random.key(0))["params"]


def param_shardings(cfg: clip.ClipConfig, mesh) -> Any:
  """`NamedSharding` per parameter, from the model's logical annotations."""
  return partitioning.logical_to_sharding(nn.get_partition_spec(abstract_params(cfg)), mesh)


def place(params: Any, shardings: Any) -> Any:
  """Host (numpy) params -> global arrays; works with several processes too."""
  return jax.tree.map(
    lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
    params,
    shardings,
  )


def encoder_problem(workdir: str) -> str:
  """ "" when the embed stage's encoder files hold the bytes they were written with (its
  checksums), else what differs."""
  return checksums.check(paths.embed_dir(workdir), PARAMS, META)


def _check_encoder(workdir: str) -> None:
  problem = encoder_problem(workdir)
  if problem:
    raise UserError(f"{problem}; rerun `avg-jax embed` (it rebuilds the encoder)")


def load_encoder(workdir: str, mesh=None) -> extract.DualEncoder:
  """The embed stage's dual encoder, parameters placed (sharded) on `mesh` (default: all
  devices); its files checked first."""
  if os.path.exists(encoder_files(workdir)[1]):
    _check_encoder(workdir)
  return load_encoder_dir(paths.embed_dir(workdir), mesh, stage_hint="run `avg-jax embed` first")


def load_encoder_dir(directory: str, mesh=None, *, stage_hint: str = "") -> extract.DualEncoder:
  """A dual encoder saved in `directory` (see the module doc): the embed stage's, or a copy made
  by `copy_encoder`. Damaged or missing files are `UserError`s naming them."""
  params_dir = os.path.join(directory, PARAMS)
  meta_file = os.path.join(directory, META)
  hint = f"; {stage_hint}" if stage_hint else ""
  if not os.path.exists(meta_file):
    raise UserError(f"{meta_file} not found{hint}")
  meta = io.read_json(meta_file)
  try:
    if meta is None:
      raise ValueError("not a JSON object")
    cfg = clip.ClipConfig.from_dict(meta["clip"])
    pre = preprocess.PreprocessConfig.from_dict(meta["preprocess"])
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f"{meta_file}: unreadable ({type(e).__name__}: {e}){hint}") from e
  mesh = mesh if mesh is not None else partitioning.make_mesh({"data": -1})
  shardings = param_shardings(cfg, mesh)
  abstract = partitioning.abstract(nn.unbox(abstract_params(cfg)), shardings)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.abspath(params_dir), abstract)
  except Exception as e:  # orbax raises many types for missing / damaged checkpoints
    raise UserError(
      f"{params_dir}: cannot restore the dual encoder ({type(e).__name__}){hint}"
    ) from e
  return extract.DualEncoder(
    cfg, params, pre, _load_tokenizer(meta["tokenizer"], directory), shardings
  )


def copy_encoder(workdir: str, target: str) -> None:
  """Copies the embed stage's dual encoder into `target` as a self-contained folder that
  `load_encoder_dir(target)` reads (the text tokenizer copied in, encoder.json pointing at it)."""
  source = paths.embed_dir(workdir)
  params_dir, meta_file = encoder_files(workdir)
  if not os.path.exists(meta_file):
    raise UserError(f"{meta_file} not found; run `avg-jax embed` first")
  _check_encoder(workdir)  # a damaged copy would carry a checksum of its own
  meta = io.read_json(meta_file)
  if meta is None:
    raise UserError(f"{meta_file}: unreadable; run `avg-jax embed` again")
  os.makedirs(target, exist_ok=True)
  shutil.copytree(params_dir, os.path.join(target, PARAMS))
  spec = dict(meta["tokenizer"])
  tokenizer_path = os.path.join(source, spec["path"])
  local = "clip_tokenizer" if spec["kind"] == "clip_bpe" else "text_tokenizer.model"
  if os.path.isdir(tokenizer_path):
    shutil.copytree(tokenizer_path, os.path.join(target, local))
  else:
    shutil.copyfile(tokenizer_path, os.path.join(target, local))
  meta["tokenizer"] = dict(spec, path=local)
  io.write_json(os.path.join(target, META), meta)


def _load_tokenizer(spec: dict, directory: str) -> Any:
  path = os.path.join(directory, spec["path"])
  if spec["kind"] == "clip_bpe":
    return bpe.ClipBpeTokenizer.load(path)
  return TextTokenizer.load(path)


def describe(cfg: clip.ClipConfig) -> str:
  return (
    f"ViT {cfg.vision_layers}x{cfg.vision_width} /{cfg.patch_size} @{cfg.image_size}, "
    f"text {cfg.text_layers}x{cfg.text_width}, projection {cfg.projection_dim}"
  )


def build_encoder(config: ml_collections.ConfigDict, workdir: str, mesh) -> extract.DualEncoder:
  """Imports or trains the encoder and saves it (params, then encoder.json)."""
  directory = paths.embed_dir(workdir)
  params_dir, meta_file = encoder_files(workdir)
  pretrained = str(config.encoder.pretrained_path)
  tokenizer: bpe.ClipBpeTokenizer | TextTokenizer
  if pretrained:
    tokenizer = bpe.ClipBpeTokenizer.load(pretrained)
    cfg, host_params = hf_import.load_hf_clip(
      pretrained, dtype=str(config.encoder.dtype), pad_token_id=tokenizer.pad_id
    )
    if bool(config.encoder.remat) != cfg.remat:
      cfg = clip.ClipConfig.from_dict(dict(cfg.to_dict(), remat=bool(config.encoder.remat)))
    pre = preprocess.PreprocessConfig.from_hf_dir(pretrained, cfg.image_size)
    shardings = param_shardings(cfg, mesh)
    params = place(host_params, shardings)
    tokenizer_spec = {"kind": "clip_bpe", "path": "clip_tokenizer"}
    if processes.is_main():
      target = os.path.join(directory, "clip_tokenizer")
      os.makedirs(target, exist_ok=True)
      for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if os.path.exists(os.path.join(pretrained, name)):
          shutil.copyfile(os.path.join(pretrained, name), os.path.join(target, name))
    log.info("embed: imported CLIP from %s (%s)", pretrained, describe(cfg))
  else:
    tokenizer_file = dataset.text_tokenizer_file(workdir)
    tokenizer = TextTokenizer.load(tokenizer_file)
    cfg, params = train_encoder(config, workdir, mesh, tokenizer)
    pre = preprocess.PreprocessConfig.for_image_size(cfg.image_size)
    shardings = param_shardings(cfg, mesh)
    tokenizer_spec = {"kind": "sentencepiece", "path": os.path.relpath(tokenizer_file, directory)}
  # Replaces a save left by an interrupted run (it has no encoder.json yet).
  checkpoints.write_pytree(params_dir, params)
  if processes.is_main():
    io.write_json(
      meta_file,
      {
        "clip": cfg.to_dict(),
        "preprocess": pre.to_dict(),
        "tokenizer": tokenizer_spec,
        "pretrained_path": pretrained,
      },
    )
    checksums.add(directory, PARAMS, META, *(["clip_tokenizer"] if pretrained else []))
    # The train state's only use was resuming; the encoder is now saved on its own.
    shutil.rmtree(paths.checkpoints_dir(directory), ignore_errors=True)
  return extract.DualEncoder(cfg, params, pre, tokenizer, shardings)


def local_encoder(
  encoder: extract.DualEncoder, mesh_config: Any
) -> tuple[extract.DualEncoder, Any]:
  """(the encoder on this process's devices only, their mesh): feature extraction needs
  nothing from other processes. The mesh follows `mesh_config` over the local devices."""
  try:
    mesh = partitioning.make_mesh(mesh_config, jax.local_devices())
  except UserError as e:
    raise UserError(
      f"embed extracts features on each process's {jax.local_device_count()} devices, config {e}"
    ) from e
  shardings = param_shardings(encoder.cfg, mesh)
  if jax.process_count() == 1:
    params = jax.device_put(encoder.params, shardings)
  else:
    # Parameters may be split over processes (fsdp / model axes): every process gathers a
    # whole copy on the host (one model's memory), then places it on its own devices.
    from jax.experimental import multihost_utils

    params = place(multihost_utils.process_allgather(encoder.params, tiled=True), shardings)
  return dataclasses.replace(encoder, params=params, param_shardings=shardings, _jitted={}), mesh
