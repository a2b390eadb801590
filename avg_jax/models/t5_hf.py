"""Hugging Face T5 checkpoints (config.json + model.safetensors) <-> our parameter tree.

No torch at run time: tensors are read and written with `safetensors` in numpy form. Works
for t5-small/base/large, t5-v1_1-* and flan-t5-* (single file or sharded with
model.safetensors.index.json). PyTorch `Linear` weights are `[out, in]`; ours are `[in, out]`
with heads split out (see avg_jax/models/t5.py).
"""

import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from avg_jax.artifacts import io
from avg_jax.errors import UserError
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config, hf_architecture, read_hf_config

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Present in some checkpoints but never used by the model: aliases of `shared.weight` and an
# old cross-attention position bias that T5 ignores.
_IGNORED_SUFFIXES = ("EncDecAttention.relative_attention_bias.weight",)
_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _safetensor_files(path: str) -> list[str]:
  single = os.path.join(path, WEIGHTS_FILE)
  if os.path.isfile(single):
    return [single]
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      weight_map = json.load(f).get("weight_map", {})
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
      raise UserError(f"{index}: shard {missing[0]} not found")
    return [os.path.join(path, f) for f in files]
  hint = (
    " (only pytorch_model.bin found: convert it to safetensors)"
    if os.path.isfile(os.path.join(path, "pytorch_model.bin"))
    else ""
  )
  raise UserError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a Hugging Face directory as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
  tensors = {}
  for file in _safetensor_files(path):
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          tensors[name] = f.get_tensor(name)
    except (OSError, ValueError) as e:
      raise UserError(f"{file}: cannot read safetensors ({e})") from e
  return tensors


def _attention_entries(hf: str, ours: tuple, cfg: T5Config):
  d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
  for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
    # torch [heads*kv, embed] -> ours [embed, heads, kv]
    yield (
      f"{hf}.{proj}.weight",
      ours + (name,),
      (h * k, d),
      lambda w: w.T.reshape(d, h, k),
      lambda p: p.reshape(d, h * k).T,
    )
  yield (
    f"{hf}.o.weight",
    ours + ("out",),
    (d, h * k),
    lambda w: w.T.reshape(h, k, d),
    lambda p: p.reshape(h * k, d).T,
  )


def _mlp_entries(hf: str, ours: tuple, cfg: T5Config):
  names = ("wi_0", "wi_1") if cfg.gated else ("wi",)
  for name in names:
    yield (
      f"{hf}.{name}.weight",
      ours + (name,),
      (cfg.d_ff, cfg.d_model),
      lambda w: w.T,
      lambda p: p.T,
    )
  yield (f"{hf}.wo.weight", ours + ("wo",), (cfg.d_model, cfg.d_ff), lambda w: w.T, lambda p: p.T)


def _norm_entry(hf: str, ours: tuple, cfg: T5Config):
  return (f"{hf}.weight", ours + ("scale",), (cfg.d_model,), _same, _same)


def _same(x):
  return x


def tensor_map(cfg: T5Config) -> Iterator[tuple[str, tuple, tuple, Callable, Callable]]:
  """Yields `(hf_name, our_path, hf_shape, hf_to_ours, ours_to_hf)` for every tensor.

  Paths use the per-layer layout (`layers_{i}`), whatever `cfg.scan_layers` says.
  """
  v, d = cfg.vocab_size, cfg.d_model
  yield ("shared.weight", ("token_embedding",), (v, d), _same, _same)
  if not cfg.tie_embeddings:
    yield ("lm_head.weight", ("output_embedding",), (v, d), _same, _same)
  buckets = (cfg.relative_attention_num_buckets, cfg.num_heads)
  for stack, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    yield (
      f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
      (stack, "relpos_bias", "rel_embedding"),
      buckets,
      _same,
      _same,
    )
    yield _norm_entry(f"{stack}.final_layer_norm", (stack, "final_norm"), cfg)
    for i in range(n):
      block, layer = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      if stack == "encoder":
        yield _norm_entry(f"{block}.0.layer_norm", layer + ("pre_attention_norm",), cfg)
        yield from _attention_entries(f"{block}.0.SelfAttention", layer + ("attention",), cfg)
        mlp_index = 1
      else:
        yield _norm_entry(f"{block}.0.layer_norm", layer + ("pre_self_attention_norm",), cfg)
        yield from _attention_entries(f"{block}.0.SelfAttention", layer + ("self_attention",), cfg)
        yield _norm_entry(f"{block}.1.layer_norm", layer + ("pre_cross_attention_norm",), cfg)
        yield from _attention_entries(
          f"{block}.1.EncDecAttention", layer + ("cross_attention",), cfg
        )
        mlp_index = 2
      yield _norm_entry(f"{block}.{mlp_index}.layer_norm", layer + ("pre_mlp_norm",), cfg)
      yield from _mlp_entries(f"{block}.{mlp_index}.DenseReluDense", layer + ("mlp",), cfg)


def _set(tree: dict, path: tuple, value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _names(names: list[str], limit: int = 5) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def hf_to_params(
  tensors: Mapping[str, np.ndarray], cfg: T5Config, *, where: str = "checkpoint"
) -> dict:
  """Hugging Face tensors -> our params (numpy, `cfg.param_dtype`, `cfg.scan_layers` layout).

  Raises `UserError` naming missing, unexpected or mis-shaped tensors.
  """
  dtype = (
    np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
  )
  params: dict = {}
  used = set()
  missing, misshaped = [], []
  for hf_name, path, shape, to_ours, _ in tensor_map(cfg):
    if hf_name not in tensors:
      missing.append(hf_name)
      continue
    used.add(hf_name)
    w = tensors[hf_name]
    if tuple(w.shape) != shape:
      misshaped.append(f"{hf_name} has shape {list(w.shape)}, expected {list(shape)}")
      continue
    _set(params, path, np.asarray(to_ours(np.asarray(w, np.float32))).astype(dtype))
  if misshaped:
    raise UserError(
      f"{where}: mis-shaped tensors: {'; '.join(misshaped[:3])}"
      + (f" and {len(misshaped) - 3} more" if len(misshaped) > 3 else "")
    )
  if missing:
    raise UserError(f"{where}: missing tensors: {_names(missing)}")
  extra = []
  for name, w in tensors.items():
    if name in used or name.endswith(_IGNORED_SUFFIXES):
      continue
    alias = name in _ALIASES or (name == "lm_head.weight" and cfg.tie_embeddings)
    if alias:
      expected = (cfg.vocab_size, cfg.d_model)
      if tuple(w.shape) != expected:
        raise UserError(
          f"{where}: mis-shaped tensors: {name} has shape {list(w.shape)}, "
          f"expected {list(expected)}"
        )
      continue
    extra.append(name)
  if extra:
    raise UserError(
      f"{where}: unexpected tensors (not a T5 of this configuration?): {_names(sorted(extra))}"
    )
  return t5_lib.stack_layer_params(params) if cfg.scan_layers else params


def params_to_hf(params: Mapping[str, Any], cfg: T5Config) -> dict[str, np.ndarray]:
  """Our params -> Hugging Face tensors (float32 numpy, contiguous)."""
  params = t5_lib.unstack_layer_params(params) if cfg.scan_layers else params
  out = {}
  for hf_name, path, _, _, to_hf in tensor_map(cfg):
    w = np.asarray(_get(params, path), np.float32)
    out[hf_name] = np.ascontiguousarray(to_hf(w))
  return out


def load_hf_t5(path: str, **overrides: Any) -> tuple[T5Config, dict]:
  """Reads a Hugging Face T5 directory: `(cfg, params)` with host numpy params.

  The config's vocabulary is the checkpoint's (`num_voken_tokens=0` unless overridden);
  `overrides` set non-architecture fields (dtype, param_dtype, dropout_rate, remat,
  scan_layers) or `num_voken_tokens` when the checkpoint already holds voken rows.
  """
  arch = hf_architecture(read_hf_config(path), os.path.join(path, "config.json"))
  cfg = T5Config(**{**arch, **overrides})
  return cfg, hf_to_params(read_safetensors(path), cfg, where=path)


def hf_config_dict(cfg: T5Config) -> dict:
  """A Hugging Face `T5Config`-compatible config.json dict for `cfg`."""
  return {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "vocab_size": cfg.vocab_size,
    "d_model": cfg.d_model,
    "d_kv": cfg.d_kv,
    "d_ff": cfg.d_ff,
    "num_heads": cfg.num_heads,
    "num_layers": cfg.num_encoder_layers,
    "num_decoder_layers": cfg.num_decoder_layers,
    "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
    "relative_attention_max_distance": cfg.relative_attention_max_distance,
    "dropout_rate": cfg.dropout_rate,
    "layer_norm_epsilon": cfg.layer_norm_epsilon,
    "initializer_factor": 1.0,
    "feed_forward_proj": cfg.feed_forward,
    "tie_word_embeddings": cfg.tie_embeddings,
    "is_encoder_decoder": True,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
  }


def save_hf_t5(path: str, params: Mapping[str, Any], cfg: T5Config) -> None:
  """Writes config.json + model.safetensors (float32) to `path`, atomically.

  The directory is written next to `path` and renamed into place, so a failure never leaves
  a partial checkpoint; an existing `path` is replaced.
  """
  tmp = io.temp_dir(path)
  try:
    io.write_json(os.path.join(tmp, "config.json"), hf_config_dict(cfg), indent=2)
    save_file(params_to_hf(params, cfg), os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    io.replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
