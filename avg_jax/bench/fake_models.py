"""Hugging Face-format CLIP and T5 directories with random weights, at any shapes (dry runs).

What `encoder.pretrained_path` and `t5.pretrained_path` read, in the files a user downloads:
config.json + model.safetensors (float32, written with `safetensors.numpy`, no torch) and the
tokenizer files (CLIP: vocab.json, merges.txt, tokenizer_config.json, preprocessor_config.json;
T5: spiece.model; avg_jax/bench/fake_tokenizers.py). Tensor names and shapes come from the
importers' own tables (`encoders.hf_import.hf_entries`, `models.t5_hf.tensor_map`), so a
directory written here is exactly what they accept. Weights are random at the scales of
Hugging Face's initialisers (layer norms 1, biases 0), so activations stay finite.
"""

import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from avg_jax.artifacts import io
from avg_jax.bench import fake_tokenizers
from avg_jax.encoders import hf_import, preprocess
from avg_jax.models import t5_hf
from avg_jax.models.t5_config import T5Config

# Our config's encoder fields (configs/base.py) -> the Hugging Face CLIP config's.
_CLIP_TOWER = {
  "width": "hidden_size",
  "layers": "num_hidden_layers",
  "heads": "num_attention_heads",
  "mlp_dim": "intermediate_size",
}


def hf_clip_config(shape: Mapping, vocab_size: int) -> dict:
  """A CLIP config.json dict for our `encoder` fields `shape` (as OpenAI's ViT-L/14-336 file:
  quick_gelu, text eos_token_id 2, so the text tower pools at the largest id)."""
  towers: dict[str, dict[str, Any]] = {}
  for tower in ("text", "vision"):
    towers[tower] = {hf: int(shape[f"{tower}_{ours}"]) for ours, hf in _CLIP_TOWER.items()}
    towers[tower].update(
      hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=int(shape["projection_dim"])
    )
  towers["text"].update(
    vocab_size=int(vocab_size),
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
    max_position_embeddings=int(shape["max_text_length"]),
  )
  towers["vision"].update(
    image_size=int(shape["image_size"]), patch_size=int(shape["patch_size"]), num_channels=3
  )
  return {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": int(shape["projection_dim"]),
    "logit_scale_init_value": 2.6592,
    "text_config": towers["text"],
    "vision_config": towers["vision"],
  }


def _write_dir(path: str, write) -> None:
  """Runs `write(tmp)` into a folder next to `path`, then moves it into place."""
  tmp = io.temp_dir(path)
  try:
    write(tmp)
    io.replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_clip(
  path: str,
  shape: Mapping,
  texts: Sequence[str],
  *,
  vocab_size: int = fake_tokenizers.CLIP_VOCAB,
  seed: int = 0,
) -> dict:
  """A CLIP directory at `shape` (our `encoder` field names); -> its config.json dict."""
  hf = hf_clip_config(shape, vocab_size)
  cfg = hf_import.config_from_hf(hf)
  rng = np.random.default_rng(seed)

  def write(tmp):
    tensors = {}
    for name, (flax_path, hf_shape, _) in hf_import.hf_entries(cfg).items():
      if flax_path[-1] == "scale":
        tensors[name] = np.ones(hf_shape, np.float32)
      elif flax_path[-1] == "bias":
        tensors[name] = np.zeros(hf_shape, np.float32)
      elif name == "logit_scale":
        tensors[name] = np.full(hf_shape, hf["logit_scale_init_value"], np.float32)
      else:
        tensors[name] = rng.standard_normal(hf_shape, np.float32) * np.float32(0.02)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    io.write_json(os.path.join(tmp, "config.json"), hf, indent=2)
    size = cfg.image_size
    io.write_json(
      os.path.join(tmp, "preprocessor_config.json"),
      {
        "crop_size": {"height": size, "width": size},
        "size": {"shortest_edge": size},
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": list(preprocess.CLIP_MEAN),
        "image_std": list(preprocess.CLIP_STD),
        "image_processor_type": "CLIPImageProcessor",
      },
      indent=2,
    )
    fake_tokenizers.write_clip_bpe(tmp, texts, vocab_size)

  _write_dir(path, write)
  return hf


def _t5_std(name: str, hf_shape: tuple, cfg: T5Config) -> float:
  """Hugging Face's T5 initialiser scales: embeddings 1; a projection (fan_in)^-0.5, the
  query also (d_kv)^-0.5 (T5 has no attention scaling); relative biases d_model^-0.5."""
  if name == "shared.weight" or name == "lm_head.weight":
    return 1.0
  if name.endswith("relative_attention_bias.weight"):
    return cfg.d_model**-0.5
  std = hf_shape[1] ** -0.5
  return std * cfg.d_kv**-0.5 if name.endswith(".q.weight") else std


def write_t5(
  path: str,
  shape: Mapping,
  texts: Sequence[str],
  *,
  vocab_size: int = 32_128,
  num_pieces: int = fake_tokenizers.T5_PIECES,
  seed: int = 0,
) -> dict:
  """A T5 v1.0 directory (ReLU, tied embeddings) at `shape` (d_model, d_kv, d_ff, num_heads,
  num_encoder_layers, num_decoder_layers) with `vocab_size` embedding rows and a spiece.model
  of `num_pieces` pieces; -> its config.json dict."""
  if num_pieces > vocab_size:
    raise ValueError(f"num_pieces {num_pieces} exceeds the model's vocab_size {vocab_size}")
  keys = ("d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers")
  sizes: dict[str, Any] = {k: int(shape[k]) for k in keys}
  cfg = T5Config(
    vocab_size=int(vocab_size),
    **sizes,
    dropout_rate=0.1,
    feed_forward="relu",
    tie_embeddings=True,
  )
  hf = t5_hf.hf_config_dict(cfg)
  rng = np.random.default_rng(seed)

  def write(tmp):
    tensors = {}
    for name, ours, hf_shape, _, _ in t5_hf.tensor_map(cfg):
      if ours[-1] == "scale":
        tensors[name] = np.ones(hf_shape, np.float32)
      else:
        std = np.float32(_t5_std(name, hf_shape, cfg))
        tensors[name] = rng.standard_normal(hf_shape, np.float32) * std
    save_file(tensors, os.path.join(tmp, t5_hf.WEIGHTS_FILE), metadata={"format": "pt"})
    del tensors
    io.write_json(os.path.join(tmp, "config.json"), hf, indent=2)
    io.write_bytes(
      os.path.join(tmp, "spiece.model"), fake_tokenizers.t5_sentencepiece(texts, num_pieces, seed)
    )

  _write_dir(path, write)
  return hf
