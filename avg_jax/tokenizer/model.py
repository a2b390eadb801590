"""The RQ-VAE image tokenizer: MLP encoder, residual quantiser, MLP decoder (flax.linen).

Architecture as the reference: each MLP layer is Dropout -> Dense -> BatchNorm -> ReLU, with no
ReLU after the last layer; Xavier-normal kernels and zero biases; encoder in -> hidden... ->
e_dim and a mirrored decoder. Whether the last layer has a BatchNorm is a config choice
(`last_layer_batchnorm`): the MLP the reference derives from (LC-Rec's `MLPLayers`) skips it.
BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9; epsilon 1e-5).

Dropout draws 8 random bits per element instead of 32 (`ByteDropout`): on CPU the random bits
cost more than the MLP's matmuls otherwise. The rate is therefore applied in steps of 1/256
(the reference's 0.25 exactly); kept units are scaled by 1 / (1 - effective rate).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from avg_jax.errors import UserError
from avg_jax.tokenizer import quantizer

# PyTorch's xavier_normal_: untruncated normal with variance 2 / (fan_in + fan_out).
_xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

SCHEMES = ("avg", "rq", "hkmeans", "atomic", "random")
RQ_SCHEMES = ("avg", "rq")


@dataclasses.dataclass(frozen=True)
class RQVAEConfig:
  """Static hyper-parameters of the RQ-VAE (from `config.tokenizer` + the embedding width)."""

  in_dim: int
  e_dim: int
  hidden_dims: tuple[int, ...]
  codebook_size: int
  num_levels: int
  shared_codebook: bool = True
  dropout: float = 0.25
  beta: float = 0.25
  last_layer_batchnorm: bool = False

  @property
  def num_codebooks(self) -> int:
    return 1 if self.shared_codebook else self.num_levels

  @classmethod
  def from_config(cls, tok: Any, in_dim: int) -> "RQVAEConfig":
    """Builds it from the `tokenizer` config section and the embedding width `in_dim`."""
    for key in ("num_levels", "codebook_size", "e_dim"):
      if int(tok[key]) < 1:
        raise UserError(f"config key tokenizer.{key} must be >= 1, got {tok[key]}")
    if not 0.0 <= float(tok.dropout) < 1.0:
      raise UserError(f"config key tokenizer.dropout must be in [0, 1), got {tok.dropout}")
    return cls(
      in_dim=int(in_dim),
      e_dim=int(tok.e_dim),
      hidden_dims=tuple(int(h) for h in tok.hidden_dims),
      codebook_size=int(tok.codebook_size),
      num_levels=int(tok.num_levels),
      shared_codebook=bool(tok.shared_codebook),
      dropout=float(tok.dropout),
      beta=float(tok.beta),
      last_layer_batchnorm=bool(tok.last_layer_batchnorm),
    )


class ByteDropout(nn.Module):
  """Inverted dropout with one random byte per element: `[..., D] -> [..., D]`.

  Drops an element when its byte is below `round(rate * 256)`. The bits are drawn with the
  input's leading dimensions (`[..., ceil(D / 4)]` words) so they shard like the batch.
  """

  rate: float
  deterministic: bool = False

  @staticmethod
  def threshold(rate: float) -> int:
    return int(round(rate * 256))

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    threshold = self.threshold(self.rate)
    if self.deterministic or threshold == 0:
      return x
    width = x.shape[-1]
    words = jax.random.bits(
      self.make_rng("dropout"), x.shape[:-1] + (-(-width // 4),), jnp.uint32
    )  # [..., ceil(D/4)]
    random_bytes = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., ceil(D/4), 4]
    random_bytes = random_bytes.reshape(x.shape[:-1] + (-1,))[..., :width]  # [..., D]
    keep_prob = 1.0 - threshold / 256.0
    return jnp.where(random_bytes >= threshold, x / keep_prob, jnp.zeros_like(x))


class MLP(nn.Module):
  """Dropout -> Dense -> BatchNorm -> ReLU per layer; `[B, in] -> [B, features[-1]]`."""

  features: Sequence[int]
  dropout: float
  last_layer_batchnorm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    last = len(self.features) - 1
    for i, width in enumerate(self.features):
      x = ByteDropout(self.dropout, deterministic=not train)(x)
      x = nn.Dense(
        width,
        kernel_init=nn.with_logical_partitioning(_xavier_normal, ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
        name=f"dense_{i}",
      )(x)  # [B, width]
      if i < last or self.last_layer_batchnorm:
        x = nn.BatchNorm(
          use_running_average=not train,
          momentum=0.9,
          epsilon=1e-5,
          scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
          name=f"norm_{i}",
        )(x)
      if i < last:
        x = nn.relu(x)
      x = nn.with_logical_constraint(x, ("batch", "mlp"))
    return x


class RQVAE(nn.Module):
  """Encoder -> residual quantiser -> decoder.

  `__call__(x [B, in_dim], train)` returns a dict: `latent [B, e_dim]` (encoder output),
  `decoded [B, in_dim]` and `rq`, the quantiser's `RQOutput` (straight-through `quantized
  [B, e_dim]`, `codes int32[B, L]`, `quant_loss []`, `residuals [L, B, e_dim]`, `errors [L, B]`).
  """

  cfg: RQVAEConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = MLP(tuple(cfg.hidden_dims) + (cfg.e_dim,), cfg.dropout, cfg.last_layer_batchnorm)
    self.decoder = MLP(
      tuple(reversed(cfg.hidden_dims)) + (cfg.in_dim,), cfg.dropout, cfg.last_layer_batchnorm
    )
    # The reference starts from zeros and fills the codebook with k-means on the first batch;
    # a small uniform init (its non-k-means default) keeps a model without k-means usable.
    bound = 1.0 / cfg.codebook_size
    self.codebooks = self.param(
      "codebooks",
      nn.with_logical_partitioning(
        lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
        ("levels", "codebook", "code_dim"),
      ),
      (cfg.num_codebooks, cfg.codebook_size, cfg.e_dim),
    )

  def encode(self, x: jax.Array, *, train: bool) -> jax.Array:
    """`[B, in_dim]` -> `[B, e_dim]` encoder output."""
    x = nn.with_logical_constraint(x, ("batch", "embed"))
    z = self.encoder(x, train=train)
    return nn.with_logical_constraint(z, ("batch", "code_dim"))

  def decode(self, quantized: jax.Array, *, train: bool) -> jax.Array:
    """`[B, e_dim]` -> `[B, in_dim]`."""
    return nn.with_logical_constraint(self.decoder(quantized, train=train), ("batch", "embed"))

  def codes(self, x: jax.Array) -> jax.Array:
    """Inference: `[B, in_dim]` -> int32[B, L] (no dropout, BatchNorm running statistics)."""
    return quantizer.quantize_codes(
      self.encode(x, train=False), self.codebooks, self.cfg.num_levels
    )

  def __call__(self, x: jax.Array, *, train: bool) -> dict:
    latent = self.encode(x, train=train)
    rq = quantizer.residual_quantize(
      latent, self.codebooks, self.cfg.num_levels, beta=self.cfg.beta
    )
    decoded = self.decode(rq.quantized, train=train)
    return dict(latent=latent, decoded=decoded, rq=rq)
