"""Import a Hugging Face CLIP directory (config.json + model.safetensors) into `Clip` params.

Reads tensors with `safetensors.numpy` (no torch). Every tensor the model needs must be present
with the expected shape, and every tensor in the files must be used: a missing, unknown or
mis-shaped tensor is a `UserError` naming it. The only tolerated extras are the
`position_ids` buffers that older PyTorch checkpoints carry.
"""

import json
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file

from avg_jax.encoders import clip
from avg_jax.errors import UserError

# HF CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults: `save_pretrained` omits fields
# equal to them, so a config.json may not spell them out.
_TEXT_DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
  pad_token_id=1,
  eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  num_channels=3,
  image_size=224,
  patch_size=32,
  hidden_act="quick_gelu",
  layer_norm_eps=1e-5,
)
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise UserError(f"file not found: {path}")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: cannot read JSON: {e}") from e


def config_from_hf(
  hf: dict, *, source: str = "config.json", dtype: str = "float32", pad_token_id: int | None = None
) -> clip.ClipConfig:
  """A `ClipConfig` from the dict of a Hugging Face CLIP config.json."""
  if hf.get("model_type", "clip") != "clip":
    raise UserError(f"{source}: model_type {hf.get('model_type')!r} is not 'clip'")
  text = {**_TEXT_DEFAULTS, **(hf.get("text_config") or hf.get("text_config_dict") or {})}
  vision = {**_VISION_DEFAULTS, **(hf.get("vision_config") or hf.get("vision_config_dict") or {})}
  if vision["num_channels"] != 3:
    raise UserError(f"{source}: vision_config.num_channels {vision['num_channels']} != 3")
  for key in ("hidden_act", "layer_norm_eps"):
    if text[key] != vision[key]:
      raise UserError(
        f"{source}: text and vision {key} differ ({text[key]!r} vs "
        f"{vision[key]!r}); avg-jax supports one value for both towers"
      )
  eos = int(text["eos_token_id"])
  return clip.ClipConfig(
    image_size=int(vision["image_size"]),
    patch_size=int(vision["patch_size"]),
    vision_width=int(vision["hidden_size"]),
    vision_layers=int(vision["num_hidden_layers"]),
    vision_heads=int(vision["num_attention_heads"]),
    vision_mlp_dim=int(vision["intermediate_size"]),
    vocab_size=int(text["vocab_size"]),
    max_text_length=int(text["max_position_embeddings"]),
    text_width=int(text["hidden_size"]),
    text_layers=int(text["num_hidden_layers"]),
    text_heads=int(text["num_attention_heads"]),
    text_mlp_dim=int(text["intermediate_size"]),
    projection_dim=int(hf.get("projection_dim", 512)),
    layer_norm_eps=float(text["layer_norm_eps"]),
    hidden_act=str(text["hidden_act"]),
    # HF keeps the argmax pooling for configs written before eos_token_id was fixed (== 2).
    text_pooling="argmax" if eos == 2 else "first_eos",
    eos_token_id=eos,
    pad_token_id=int(text["pad_token_id"] if pad_token_id is None else pad_token_id),
    logit_scale_init=float(hf.get("logit_scale_init_value", math.log(1 / 0.07))),
    dtype=dtype,
  )


# A mapping entry: HF name -> (flax param path, expected HF shape, HF array -> flax array).
_Entry = tuple[tuple[str, ...], tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _tower_entries(
  prefix: str, flax_root: str, width: int, heads: int, mlp: int, layers: int
) -> dict[str, _Entry]:
  head_dim = width // heads
  keep = lambda a: a
  t = lambda a: a.T
  out: dict[str, _Entry] = {}
  for i in range(layers):
    hf = f"{prefix}.encoder.layers.{i}"
    fx = (flax_root, f"block_{i}")
    for name in ("q", "k", "v"):
      target = {"q": "query", "k": "key", "v": "value"}[name]
      # torch Linear weight [out = heads * head_dim, in] -> DenseGeneral kernel [in, heads, kv].
      out[f"{hf}.self_attn.{name}_proj.weight"] = (
        fx + ("attn", target, "kernel"),
        (width, width),
        lambda a: a.T.reshape(width, heads, head_dim),
      )
      out[f"{hf}.self_attn.{name}_proj.bias"] = (
        fx + ("attn", target, "bias"),
        (width,),
        lambda a: a.reshape(heads, head_dim),
      )
    out[f"{hf}.self_attn.out_proj.weight"] = (
      fx + ("attn", "out", "kernel"),
      (width, width),
      lambda a: a.T.reshape(heads, head_dim, width),
    )
    out[f"{hf}.self_attn.out_proj.bias"] = (fx + ("attn", "out", "bias"), (width,), keep)
    for ln in ("1", "2"):
      out[f"{hf}.layer_norm{ln}.weight"] = (fx + (f"ln{ln}", "scale"), (width,), keep)
      out[f"{hf}.layer_norm{ln}.bias"] = (fx + (f"ln{ln}", "bias"), (width,), keep)
    out[f"{hf}.mlp.fc1.weight"] = (fx + ("mlp", "fc1", "kernel"), (mlp, width), t)
    out[f"{hf}.mlp.fc1.bias"] = (fx + ("mlp", "fc1", "bias"), (mlp,), keep)
    out[f"{hf}.mlp.fc2.weight"] = (fx + ("mlp", "fc2", "kernel"), (width, mlp), t)
    out[f"{hf}.mlp.fc2.bias"] = (fx + ("mlp", "fc2", "bias"), (width,), keep)
  return out


def hf_entries(cfg: clip.ClipConfig) -> dict[str, _Entry]:
  """Every HF tensor name of a CLIPModel with this config, mapped onto the flax tree."""
  keep = lambda a: a
  p, wv, wt = cfg.patch_size, cfg.vision_width, cfg.text_width
  out: dict[str, _Entry] = {
    "text_model.embeddings.token_embedding.weight": (
      ("text", "token_embedding"),
      (cfg.vocab_size, wt),
      keep,
    ),
    "text_model.embeddings.position_embedding.weight": (
      ("text", "position_embedding"),
      (cfg.max_text_length, wt),
      keep,
    ),
    "text_model.final_layer_norm.weight": (("text", "final_ln", "scale"), (wt,), keep),
    "text_model.final_layer_norm.bias": (("text", "final_ln", "bias"), (wt,), keep),
    "vision_model.embeddings.class_embedding": (("vision", "class_embedding"), (wv,), keep),
    # Conv weight [out, in, kh, kw] -> dense kernel over (row, col, channel)-flattened patches.
    "vision_model.embeddings.patch_embedding.weight": (
      ("vision", "patch_embedding"),
      (wv, 3, p, p),
      lambda a: a.transpose(2, 3, 1, 0).reshape(p * p * 3, wv),
    ),
    "vision_model.embeddings.position_embedding.weight": (
      ("vision", "position_embedding"),
      (cfg.num_patches + 1, wv),
      keep,
    ),
    "vision_model.pre_layrnorm.weight": (("vision", "pre_ln", "scale"), (wv,), keep),
    "vision_model.pre_layrnorm.bias": (("vision", "pre_ln", "bias"), (wv,), keep),
    "vision_model.post_layernorm.weight": (("vision", "post_ln", "scale"), (wv,), keep),
    "vision_model.post_layernorm.bias": (("vision", "post_ln", "bias"), (wv,), keep),
    "visual_projection.weight": (
      ("visual_projection", "kernel"),
      (cfg.projection_dim, wv),
      lambda a: a.T,
    ),
    "text_projection.weight": (
      ("text_projection", "kernel"),
      (cfg.projection_dim, wt),
      lambda a: a.T,
    ),
    "logit_scale": (("logit_scale",), (), lambda a: a.reshape(())),
  }
  out.update(
    _tower_entries("text_model", "text", wt, cfg.text_heads, cfg.text_mlp_dim, cfg.text_layers)
  )
  out.update(
    _tower_entries(
      "vision_model", "vision", wv, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_layers
    )
  )
  return out


def _weight_files(path: str) -> list[str]:
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    return [single]
  if os.path.exists(index):
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    if not shards:
      raise UserError(f"{index}: empty weight_map")
    return [os.path.join(path, s) for s in shards]
  raise UserError(
    f"no model.safetensors (or model.safetensors.index.json) in {path}; "
    "convert PyTorch .bin weights to safetensors first"
  )


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of the directory's safetensors file(s), as numpy arrays."""
  tensors: dict[str, np.ndarray] = {}
  for file in _weight_files(path):
    if not os.path.exists(file):
      raise UserError(f"weight file not found: {file}")
    try:
      tensors.update(load_file(file))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise UserError(f"{file}: cannot read safetensors: {e}") from e
  return tensors


def convert(
  tensors: dict[str, np.ndarray], cfg: clip.ClipConfig, *, source: str = "model.safetensors"
) -> dict[str, Any]:
  """HF tensors -> nested flax `params` dict (float32 numpy), strictly checked."""
  entries = hf_entries(cfg)
  missing = sorted(set(entries) - set(tensors))
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise UserError(f"{source}: missing tensor {missing[0]}{more}")
  unknown = sorted(set(tensors) - set(entries) - set(_IGNORED))
  if unknown:
    more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
    raise UserError(f"{source}: unexpected tensor {unknown[0]}{more}")
  flat = {}
  for name, (flax_path, shape, transform) in entries.items():
    array = np.asarray(tensors[name])
    if tuple(array.shape) != tuple(shape):
      raise UserError(
        f"{source}: tensor {name} has shape {list(array.shape)}, expected "
        f"{list(shape)} from config.json"
      )
    flat[flax_path] = np.array(transform(array.astype(np.float32)), order="C")
  params = traverse_util.unflatten_dict(flat)
  _check_tree(params, cfg)
  return params


def _check_tree(params: dict, cfg: clip.ClipConfig) -> None:
  """The mapping must fill exactly the model's parameter tree (a bug otherwise, not user error)."""
  abstract = nn.unbox(jax.eval_shape(clip.init_fn(cfg), jax.random.key(0))["params"])
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract).items()}
  got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
  diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
  assert not diff, (
    f"HF mapping does not match the model tree: {[(k, want.get(k), got.get(k)) for k in diff[:3]]}"
  )


def load_hf_clip(
  path: str, *, dtype: str = "float32", pad_token_id: int | None = None
) -> tuple[clip.ClipConfig, dict[str, Any]]:
  """Reads a HF CLIP directory -> (`ClipConfig`, params as float32 numpy arrays)."""
  if not os.path.isdir(path):
    raise UserError(f"pretrained CLIP directory not found: {path}")
  cfg = config_from_hf(
    _read_json(os.path.join(path, "config.json")),
    source=os.path.join(path, "config.json"),
    dtype=dtype,
    pad_token_id=pad_token_id,
  )
  files = _weight_files(path)
  params = convert(read_tensors(path), cfg, source=files[0] if len(files) == 1 else path)
  return cfg, params
