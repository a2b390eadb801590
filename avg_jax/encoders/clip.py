"""A CLIP dual encoder in flax.linen: ViT image tower, causal text transformer, projections.

The architecture follows OpenAI CLIP as laid out by Hugging Face `CLIPModel` (pre-LayerNorm
blocks, `pre_layrnorm` before the vision blocks, class-token pooling with `post_layernorm`,
text pooling at the end-of-text token, bias-free projections), so that weights import one to
one (`avg_jax.encoders.hf_import`). Sizes range from the tiny CPU configs to ViT-L/14-336.

Inputs: images are `float[batch, H, W, 3]` already normalised (`avg_jax.encoders.preprocess`);
text is `int[batch, length]` token ids. Outputs are projected, *not* normalised, features.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avg_jax.errors import UserError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_ACTIVATIONS = ("quick_gelu", "gelu")
_POOLINGS = ("first_eos", "argmax")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Shape of a CLIP model; every field is plain data (JSON-serialisable)."""

  image_size: int = 224
  patch_size: int = 16
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_dim: int = 3072
  vocab_size: int = 49408
  max_text_length: int = 77
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_dim: int = 2048
  projection_dim: int = 512
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI) | "gelu" (exact erf)
  # Text features are read at the end-of-text token: "first_eos" finds the first `eos_token_id`;
  # "argmax" takes the largest id (HF's behaviour for old configs whose eos_token_id is 2, which
  # works because <|endoftext|> is the largest id of the OpenAI vocabulary).
  text_pooling: str = "first_eos"
  eos_token_id: int = 49407
  pad_token_id: int = 0
  logit_scale_init: float = math.log(1 / 0.07)
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: bool = False  # rematerialise each block in the backward pass

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise UserError(
        f"encoder: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
      )
    for name in ("vision", "text"):
      width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
      if width % heads:
        raise UserError(f"encoder: {name}_width {width} is not divisible by {name}_heads {heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise UserError(f"encoder: hidden_act {self.hidden_act!r} is not one of {_ACTIVATIONS}")
    if self.text_pooling not in _POOLINGS:
      raise UserError(f"encoder: text_pooling {self.text_pooling!r} is not one of {_POOLINGS}")
    if self.dtype not in _DTYPES:
      raise UserError(f"encoder: dtype {self.dtype!r} is not one of {tuple(_DTYPES)}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ClipConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise UserError(f"encoder config: unknown field {sorted(unknown)[0]!r}")
    return cls(**d)

  @classmethod
  def from_config(
    cls,
    encoder_config: Mapping[str, Any],
    *,
    vocab_size: int,
    eos_token_id: int,
    pad_token_id: int,
    init_temperature: float = 0.07,
  ) -> "ClipConfig":
    """From the `encoder` config section and the text tokenizer's vocabulary."""
    c = encoder_config
    return cls(
      image_size=int(c["image_size"]),
      patch_size=int(c["patch_size"]),
      vision_width=int(c["vision_width"]),
      vision_layers=int(c["vision_layers"]),
      vision_heads=int(c["vision_heads"]),
      vision_mlp_dim=int(c["vision_mlp_dim"]),
      vocab_size=int(vocab_size),
      max_text_length=int(c["max_text_length"]),
      text_width=int(c["text_width"]),
      text_layers=int(c["text_layers"]),
      text_heads=int(c["text_heads"]),
      text_mlp_dim=int(c["text_mlp_dim"]),
      projection_dim=int(c["projection_dim"]),
      text_pooling="first_eos",
      eos_token_id=int(eos_token_id),
      pad_token_id=int(pad_token_id),
      logit_scale_init=math.log(1 / float(init_temperature)),
      dtype=str(c["dtype"]),
      remat=bool(c.get("remat", False)),
    )


def _init(init_fn, *names):
  return nn.with_logical_partitioning(init_fn, names)


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (bfloat16 statistics are too coarse), output in `dtype`."""

  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):  # [..., embed]
    width = x.shape[-1]
    scale = self.param("scale", _init(nn.initializers.ones, "embed"), (width,))
    bias = self.param("bias", _init(nn.initializers.zeros, "embed"), (width,))
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


class HeadProjection(nn.Module):
  """x @ kernel + bias with a multi-dimensional kernel, e.g. `[embed, heads, kv]`.

  Written out (not nn.DenseGeneral) because DenseGeneral initialises a flattened 2-D kernel,
  which a 3-name logical annotation cannot describe.
  """

  kernel_shape: tuple[int, ...]
  kernel_names: tuple[str, ...]
  num_contract: int  # leading kernel dims contracted with the input's last dims
  dtype: Any

  @nn.compact
  def __call__(self, x):
    fan_in = math.prod(self.kernel_shape[: self.num_contract])
    kernel = self.param(
      "kernel", _init(nn.initializers.normal(fan_in**-0.5), *self.kernel_names), self.kernel_shape
    )
    bias = self.param(
      "bias",
      _init(nn.initializers.zeros, *self.kernel_names[self.num_contract :]),
      self.kernel_shape[self.num_contract :],
    )
    axes = (tuple(range(x.ndim - self.num_contract, x.ndim)), tuple(range(self.num_contract)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (axes, ((), ())))
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections (CLIP layout)."""

  num_heads: int
  dtype: Any
  causal: bool = False

  @nn.compact
  def __call__(self, x):  # [batch, length, embed]
    width = x.shape[-1]
    head_dim = width // self.num_heads
    in_shape, in_names = (width, self.num_heads, head_dim), ("embed", "heads", "kv")
    q = HeadProjection(in_shape, in_names, 1, self.dtype, name="query")(x)  # [b, l, heads, kv]
    k = HeadProjection(in_shape, in_names, 1, self.dtype, name="key")(x)
    v = HeadProjection(in_shape, in_names, 1, self.dtype, name="value")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "kv_length", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "kv_length", "heads", "kv"))
    # Scale q before the product (as HF does) so float32 results match to the last bits.
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = nn.with_logical_constraint(scores, ("batch", "heads", "length", "kv_length"))
    if self.causal:
      length = x.shape[1]
      allowed = jnp.tril(jnp.ones((length, length), bool))
      scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)  # [batch, length, heads, kv]
    out = HeadProjection(
      (self.num_heads, head_dim, width), ("heads", "kv", "embed"), 2, self.dtype, name="out"
    )(out)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class Mlp(nn.Module):
  mlp_dim: int
  hidden_act: str
  dtype: Any

  @nn.compact
  def __call__(self, x):  # [batch, length, embed]
    width = x.shape[-1]
    h = nn.Dense(
      self.mlp_dim,
      dtype=self.dtype,
      name="fc1",
      kernel_init=_init(nn.initializers.normal(width**-0.5), "embed", "mlp"),
      bias_init=_init(nn.initializers.zeros, "mlp"),
    )(x)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = _activation(self.hidden_act, h.astype(jnp.float32)).astype(self.dtype)
    out = nn.Dense(
      width,
      dtype=self.dtype,
      name="fc2",
      kernel_init=_init(nn.initializers.normal(self.mlp_dim**-0.5), "mlp", "embed"),
      bias_init=_init(nn.initializers.zeros, "embed"),
    )(h)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class Block(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)); x + mlp(ln2(x))."""

  num_heads: int
  mlp_dim: int
  hidden_act: str
  eps: float
  dtype: Any
  causal: bool = False

  @nn.compact
  def __call__(self, x):  # [batch, length, embed]
    h = LayerNorm(self.eps, self.dtype, name="ln1")(x)
    x = x + Attention(self.num_heads, self.dtype, self.causal, name="attn")(h)
    h = LayerNorm(self.eps, self.dtype, name="ln2")(x)
    x = x + Mlp(self.mlp_dim, self.hidden_act, self.dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _blocks(
  cfg: ClipConfig, x, *, prefix: str, num_layers: int, heads: int, mlp_dim: int, causal: bool
):
  block_cls = nn.remat(Block) if cfg.remat else Block
  for i in range(num_layers):
    x = block_cls(
      heads,
      mlp_dim,
      cfg.hidden_act,
      cfg.layer_norm_eps,
      cfg.compute_dtype,
      causal,
      name=f"{prefix}{i}",
    )(x)
  return x


class VisionTower(nn.Module):
  """ViT: patches -> [class token; patches] + positions -> blocks -> class token."""

  cfg: ClipConfig

  @nn.compact
  def __call__(self, images):  # [batch, H, W, 3] normalised
    cfg = self.cfg
    p, width = cfg.patch_size, cfg.vision_width
    b, h, w, c = images.shape
    if (h, w) != (cfg.image_size, cfg.image_size):
      raise ValueError(f"expected {cfg.image_size}x{cfg.image_size} images, got {h}x{w}")
    # A stride-p convolution without bias == a dense layer on flattened (row, col, channel)
    # patches; the einsum form keeps the kernel 2-D with plain logical names.
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, cfg.num_patches, p * p * c).astype(cfg.compute_dtype)
    kernel = self.param(
      "patch_embedding",
      _init(nn.initializers.normal((p * p * c) ** -0.5), "patch", "embed"),
      (p * p * c, width),
    )
    x = jnp.einsum("bnp,pd->bnd", patches, kernel.astype(cfg.compute_dtype))
    cls = self.param(
      "class_embedding", _init(nn.initializers.normal(width**-0.5), "embed"), (width,)
    )
    pos = self.param(
      "position_embedding",
      _init(nn.initializers.normal(0.02), "length", "embed"),
      (cfg.num_patches + 1, width),
    )
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, width))
    x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="pre_ln")(x)
    x = _blocks(
      cfg,
      x,
      prefix="block_",
      num_layers=cfg.vision_layers,
      heads=cfg.vision_heads,
      mlp_dim=cfg.vision_mlp_dim,
      causal=False,
    )
    return LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="post_ln")(x[:, 0])  # [b, w]


def text_pool_index(cfg: ClipConfig, tokens: jax.Array) -> jax.Array:
  """`[batch]` position whose hidden state is the text feature, exactly as Hugging Face's
  `CLIPTextTransformer` picks it.

  "first_eos": the first position holding `eos_token_id` (`argmax(ids == eos)`); a row without
  EOS pools position 0, as HF does. "argmax": the position of the largest id (first on ties).
  Neither looks at `pad_token_id`: a pad id in the middle of a row is an ordinary token here,
  as it is for HF (our tokenizers always keep EOS, so only hand-made ids reach these cases).
  """
  if cfg.text_pooling == "argmax":
    return jnp.argmax(tokens, axis=-1)
  return jnp.argmax(tokens == cfg.eos_token_id, axis=-1)


class TextTower(nn.Module):
  """Causal transformer over token + position embeddings, read at the end-of-text token."""

  cfg: ClipConfig

  @nn.compact
  def __call__(self, tokens):  # [batch, length] int
    cfg = self.cfg
    length = tokens.shape[1]
    if length > cfg.max_text_length:
      raise ValueError(f"text length {length} exceeds max_text_length {cfg.max_text_length}")
    emb = self.param(
      "token_embedding",
      _init(nn.initializers.normal(0.02), "vocab", "embed"),
      (cfg.vocab_size, cfg.text_width),
    )
    pos = self.param(
      "position_embedding",
      _init(nn.initializers.normal(0.01), "length", "embed"),
      (cfg.max_text_length, cfg.text_width),
    )
    x = jnp.take(emb, tokens, axis=0) + pos[:length][None]
    x = nn.with_logical_constraint(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))
    # Causal attention also keeps padding after EOS out of the pooled position, so no padding
    # mask is needed for the feature (HF passes one; it changes only the positions after EOS).
    x = _blocks(
      cfg,
      x,
      prefix="block_",
      num_layers=cfg.text_layers,
      heads=cfg.text_heads,
      mlp_dim=cfg.text_mlp_dim,
      causal=True,
    )
    x = LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype, name="final_ln")(x)
    index = text_pool_index(cfg, tokens)
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]  # [batch, width]


class Clip(nn.Module):
  """The dual encoder. `__call__` returns (image_features, text_features, logit_scale)."""

  cfg: ClipConfig

  def setup(self):
    cfg = self.cfg
    self.vision = VisionTower(cfg)
    self.text = TextTower(cfg)
    # Bias-free projections to the shared space; the output axis is small and replicated.
    self.visual_projection = nn.Dense(
      cfg.projection_dim,
      use_bias=False,
      dtype=cfg.compute_dtype,
      kernel_init=_init(nn.initializers.normal(cfg.vision_width**-0.5), "embed", None),
    )
    self.text_projection = nn.Dense(
      cfg.projection_dim,
      use_bias=False,
      dtype=cfg.compute_dtype,
      kernel_init=_init(nn.initializers.normal(cfg.text_width**-0.5), "embed", None),
    )
    self.logit_scale = self.param(
      "logit_scale", _init(nn.initializers.constant(cfg.logit_scale_init)), ()
    )

  def encode_image(self, images):
    """`[batch, H, W, 3]` normalised -> `float32[batch, projection_dim]` (not normalised)."""
    return self.visual_projection(self.vision(images)).astype(jnp.float32)

  def encode_text(self, tokens):
    """`int[batch, length]` -> `float32[batch, projection_dim]` (not normalised)."""
    return self.text_projection(self.text(tokens)).astype(jnp.float32)

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens), self.logit_scale


def init_fn(cfg: ClipConfig):
  """`rng -> boxed variables` for `partitioning.sharded_init` (dummy inputs of the right shape)."""
  model = Clip(cfg)

  def init(rng):
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    tokens = jnp.zeros((1, cfg.max_text_length), jnp.int32)
    return model.init(rng, images, tokens)

  return init


def encode_images(params: Any, cfg: ClipConfig, images: jax.Array) -> jax.Array:
  """Image features `float32[batch, projection_dim]` from normalised `[batch, H, W, 3]`."""
  # flax types apply's result as output | (output, state); without mutable= it is the output.
  return Clip(cfg).apply({"params": params}, images, method=Clip.encode_image)  # type: ignore[return-value]


def encode_texts(params: Any, cfg: ClipConfig, tokens: jax.Array) -> jax.Array:
  """Text features `float32[batch, projection_dim]` from token ids `int[batch, length]`."""
  # flax types apply's result as output | (output, state); without mutable= it is the output.
  return Clip(cfg).apply({"params": params}, tokens, method=Clip.encode_text)  # type: ignore[return-value]
