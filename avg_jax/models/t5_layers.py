"""T5 building blocks: RMS norm, relative position buckets and bias, attention, feed-forward.

Every parameter carries logical axis names (avg_jax/partitioning.py); kernels are stored in
`param_dtype` and cast to the compute `dtype` at use. Norm statistics, softmax and position
biases are float32 whatever the compute dtype.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax.models.t5_config import T5Config

# Added to attention logits of masked keys. Finite (not -inf) so that a row with every key
# masked (an all-padding query) gives a uniform, not NaN, distribution.
MASK_VALUE = -1e10


def normal_init(stddev: float):
  """Plain (untruncated) normal initialiser; T5 initialises every matrix this way."""
  return nn.initializers.normal(stddev=stddev)


def _param(module: nn.Module, name: str, init, shape, names):
  return module.param(
    name, nn.with_logical_partitioning(init, names), shape, module.cfg.storage_dtype
  )


def dropout(module: nn.Module, x: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """Inverted dropout drawing from `module`'s "dropout" rng; identity when deterministic.

  A function rather than `nn.Dropout` so that setup-style modules can call it from any method.
  """
  if deterministic or rate == 0.0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class RMSNorm(nn.Module):
  """T5's layer norm: scale * x / sqrt(mean(x**2) + eps); no mean subtraction, no bias."""

  cfg: T5Config

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., embed]` -> same shape, in the compute dtype."""
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + self.cfg.layer_norm_epsilon)
    # Scale in float32, then cast: the same rounding order as the PyTorch reference in fp32.
    return (scale.astype(jnp.float32) * y).astype(self.cfg.compute_dtype)


def relative_position_buckets(
  query_length: int, key_length: int, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
  """Bucket of each (query, key) offset: `int32[query_length, key_length]`.

  Offsets `key - query` below `max_exact` get their own bucket; larger ones share
  logarithmically wider buckets up to `max_distance`, beyond which all share the last one.
  Bidirectional attention gives keys after the query the upper half of the buckets; causal
  attention only distinguishes keys at or before the query. Computed on the host (shapes are
  static), in float32 with a multiply by the reciprocal of log(max_distance / max_exact),
  which reproduces the reference's float32 rounding at bucket boundaries.
  """
  offset = (
    np.arange(key_length, dtype=np.int64)[None, :]
    - np.arange(query_length, dtype=np.int64)[:, None]
  )
  if bidirectional:
    num_buckets //= 2
    bucket = (offset > 0).astype(np.int64) * num_buckets
    distance = np.abs(offset)
  else:
    bucket = np.zeros_like(offset)
    distance = np.maximum(-offset, 0)
  max_exact = num_buckets // 2
  # Only read where distance >= max_exact, so clamping keeps log() finite without changing it.
  scaled = np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact)
  inv_log_range = np.float32(1.0) / np.float32(math.log(max_distance / max_exact))
  log_bucket = np.log(scaled) * inv_log_range * np.float32(num_buckets - max_exact)
  large = max_exact + log_bucket.astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  bucket = bucket + np.where(distance < max_exact, distance, large)
  return bucket.astype(np.int32)


class RelativePositionBias(nn.Module):
  """Learned scalar bias per (bucket, head), shared by all layers of one stack."""

  cfg: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, query_length: int, key_length: int) -> jax.Array:
    """Returns the float32 bias `[heads, query_length, key_length]`."""
    cfg = self.cfg
    table = _param(
      self,
      "rel_embedding",
      normal_init(cfg.d_model**-0.5),
      (cfg.relative_attention_num_buckets, cfg.num_heads),
      ("relpos_buckets", "heads"),
    )
    buckets = relative_position_buckets(
      query_length,
      key_length,
      bidirectional=self.bidirectional,
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
    )
    bias = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [q, k, heads]
    return jnp.transpose(bias, (2, 0, 1))


class Attention(nn.Module):
  """Multi-head dot-product attention without the 1/sqrt(d_kv) factor (T5 folds it into
  the query initialisation) and without biases."""

  cfg: T5Config

  def setup(self):
    cfg = self.cfg
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    self.query = _param(
      self, "query", normal_init((d * k) ** -0.5), (d, h, k), ("embed", "heads", "kv")
    )
    self.key = _param(self, "key", normal_init(d**-0.5), (d, h, k), ("embed", "heads", "kv"))
    self.value = _param(self, "value", normal_init(d**-0.5), (d, h, k), ("embed", "heads", "kv"))
    self.out = _param(
      self, "out", normal_init((h * k) ** -0.5), (h, k, d), ("heads", "kv", "embed")
    )

  def _project(self, kernel: jax.Array, x: jax.Array) -> jax.Array:
    dt = self.cfg.compute_dtype
    y = jnp.einsum("bld,dhk->blhk", x.astype(dt), kernel.astype(dt))
    return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

  def key_value(self, inputs_kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`inputs_kv [batch, kv_length, embed]` -> keys, values `[batch, kv_length, heads, kv]`."""
    return self._project(self.key, inputs_kv), self._project(self.value, inputs_kv)

  def __call__(
    self,
    inputs_q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    bias: jax.Array,
    deterministic: bool,
  ) -> jax.Array:
    """Attends `inputs_q [batch, q, embed]` to precomputed `keys`/`values`
    `[batch, kv_length, heads, kv]`; `bias` (float32, broadcastable to
    `[batch, heads, q, kv_length]`) holds position biases and masks. Returns `[batch, q, embed]`.
    """
    cfg = self.cfg
    dt = cfg.compute_dtype
    q = self._project(self.query, inputs_q)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, keys.astype(dt), preferred_element_type=jnp.float32)
    scores = scores + bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dt)
    weights = dropout(self, weights, cfg.dropout_rate, deterministic)
    y = jnp.einsum("bhqs,bshk->bqhk", weights, values.astype(dt))
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))
    out = jnp.einsum("bqhk,hkd->bqd", y, self.out.astype(dt))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


_ACTIVATIONS = {
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  # Hugging Face's "gelu_new": the tanh approximation.
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class FeedForward(nn.Module):
  """`wo(act(wi x))` (T5 v1.0) or `wo(act(wi_0 x) * wi_1 x)` (gated, T5 v1.1)."""

  cfg: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """`x [batch, length, embed]` -> `[batch, length, embed]`."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    act = _ACTIVATIONS[cfg.activation]
    wi_init = normal_init(cfg.d_model**-0.5)
    x = x.astype(dt)
    if cfg.gated:
      wi_0 = _param(self, "wi_0", wi_init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
      wi_1 = _param(self, "wi_1", wi_init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
      h = act(x @ wi_0.astype(dt)) * (x @ wi_1.astype(dt))
    else:
      wi = _param(self, "wi", wi_init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"))
      h = act(x @ wi.astype(dt))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = dropout(self, h, cfg.dropout_rate, deterministic)
    wo = _param(self, "wo", normal_init(cfg.d_ff**-0.5), (cfg.d_ff, cfg.d_model), ("mlp", "embed"))
    out = h @ wo.astype(dt)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))
