"""`T5Config`: the static (hashable) description of a T5 encoder-decoder with voken rows.

The vocabulary is the text vocabulary followed by the voken rows (layout: avg_jax/vokens.py):
`vocab_size = text_vocab_size + num_voken_tokens`. Architecture switches follow T5 v1.0
(ReLU, tied embeddings with d_model**-0.5 output scaling) and T5 v1.1 (gated-GELU, untied).
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from avg_jax.errors import UserError
from avg_jax.vokens import VokenVocabulary

# Feed-forward variants: name -> (activation, gated). Names follow Hugging Face's
# `feed_forward_proj` so imported configs map one-to-one ("gated-gelu" is the tanh GELU).
FEED_FORWARD = {
  "relu": ("relu", False),
  "gated-gelu": ("gelu_tanh", True),
  "gated-relu": ("relu", True),
  "gated-silu": ("silu", True),
}
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hashable T5 hyper-parameters; pass as a static argument to jitted functions."""

  vocab_size: int  # all rows: text vocabulary + voken rows
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  feed_forward: str = "relu"  # a key of FEED_FORWARD
  tie_embeddings: bool = True
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"  # storage dtype of parameters
  remat: bool = False  # recompute each layer's activations in the backward pass
  scan_layers: bool = False  # nn.scan over layers: parameters get a leading "layers" axis
  num_voken_tokens: int = 0  # the last rows of the vocabulary are voken rows

  def __post_init__(self):
    if self.feed_forward not in FEED_FORWARD:
      raise UserError(
        f"t5.feed_forward: {self.feed_forward!r} is not one of {', '.join(FEED_FORWARD)}"
      )
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in _DTYPES:
        raise UserError(f"t5.{key}: {getattr(self, key)!r} is not one of {', '.join(_DTYPES)}")
    if not 0 <= self.num_voken_tokens < self.vocab_size:
      raise UserError(
        f"t5: num_voken_tokens {self.num_voken_tokens} must be in [0, vocab_size {self.vocab_size})"
      )
    if self.relative_attention_num_buckets < 4:
      raise UserError("t5.relative_attention_num_buckets must be at least 4")

  @property
  def text_vocab_size(self) -> int:
    return self.vocab_size - self.num_voken_tokens

  @property
  def first_voken_id(self) -> int:
    return self.text_vocab_size

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def activation(self) -> str:
    return FEED_FORWARD[self.feed_forward][0]

  @property
  def gated(self) -> bool:
    return FEED_FORWARD[self.feed_forward][1]

  def replace(self, **changes: Any) -> "T5Config":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_config(cls, c: Mapping[str, Any], vocab: VokenVocabulary | None) -> "T5Config":
    """Builds the config from the `t5` config section and the voken vocabulary.

    With `c.pretrained_path` set, the architecture (sizes, feed-forward, tying, epsilon)
    comes from that Hugging Face directory's config.json; dropout, dtypes, remat and scan
    always come from `c`. `vocab=None` gives a text-only model.
    """
    if c.get("pretrained_path"):
      arch = hf_architecture(read_hf_config(c["pretrained_path"]), c["pretrained_path"])
      source = os.path.join(c["pretrained_path"], "config.json")
    else:
      arch = {k: c[k] for k in _ARCH_KEYS}
      arch["feed_forward"] = c["feed_forward"]
      arch["tie_embeddings"] = bool(c["tie_embeddings"])
      source = "config t5.vocab_size"
    text_vocab = arch.pop("vocab_size")
    num_voken = 0
    if vocab is not None:
      if vocab.text_vocab_size != text_vocab:
        raise UserError(
          f"{source}: text vocabulary has {text_vocab} rows but the voken "
          f"vocabulary expects text_vocab_size={vocab.text_vocab_size}"
        )
      num_voken = vocab.num_voken_tokens
    return cls(
      vocab_size=text_vocab + num_voken,
      num_voken_tokens=num_voken,
      dropout_rate=float(c["dropout_rate"]),
      dtype=c["dtype"],
      param_dtype=c["param_dtype"],
      remat=bool(c["remat"]),
      scan_layers=bool(c["scan_layers"]),
      **arch,
    )


_ARCH_KEYS = (
  "vocab_size",
  "d_model",
  "d_kv",
  "d_ff",
  "num_heads",
  "num_encoder_layers",
  "num_decoder_layers",
  "relative_attention_num_buckets",
  "relative_attention_max_distance",
  "layer_norm_epsilon",
)


def read_hf_config(path: str) -> dict:
  """Reads `<path>/config.json` of a Hugging Face T5 directory."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise UserError(
      f"t5.pretrained_path: {file} not found (expected a Hugging Face T5 "
      "directory with config.json and model.safetensors)"
    )
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{file}: not valid JSON ({e.msg} on line {e.lineno})") from e


def hf_architecture(hf: Mapping[str, Any], where: str = "config.json") -> dict:
  """Maps a Hugging Face T5 config.json dict to our architecture fields (incl. vocab_size)."""
  required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
  missing = [k for k in required if k not in hf]
  if missing:
    raise UserError(f"{where}: config.json lacks {', '.join(missing)}")
  model_type = hf.get("model_type", "t5")
  if model_type != "t5":
    raise UserError(f"{where}: model_type {model_type!r} is not 't5'")
  ff = hf.get("feed_forward_proj", "relu")
  if ff not in FEED_FORWARD:
    raise UserError(
      f"{where}: feed_forward_proj {ff!r} is not supported ({', '.join(FEED_FORWARD)})"
    )
  return dict(
    vocab_size=int(hf["vocab_size"]),
    d_model=int(hf["d_model"]),
    d_kv=int(hf["d_kv"]),
    d_ff=int(hf["d_ff"]),
    num_heads=int(hf["num_heads"]),
    num_encoder_layers=int(hf["num_layers"]),
    num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
    relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
    relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
    layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
    feed_forward=ff,
    tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
  )
