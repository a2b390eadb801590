"""T5 encoder-decoder (v1.0 / v1.1 choices by config) with voken rows, and its pure API.

Parameter tree (`params`, i.e. `variables["params"]`):

    token_embedding [vocab, embed]                 shared by encoder, decoder (and output if tied)
    output_embedding [vocab, embed]                only when untied (T5 v1.1)
    encoder/relpos_bias/rel_embedding [relpos_buckets, heads]
    encoder/layers_{i}/{pre_attention_norm, attention, pre_mlp_norm, mlp}
    encoder/final_norm/scale [embed]
    decoder/relpos_bias/rel_embedding
    decoder/layers_{i}/{pre_self_attention_norm, self_attention, pre_cross_attention_norm,
                        cross_attention, pre_mlp_norm, mlp}
    decoder/final_norm/scale

With `scan_layers`, `layers_{i}` become one `layers` subtree whose leaves have a leading
`layers` axis (`stack_layer_params` / `unstack_layer_params` convert). Attention kernels are
`query/key/value [embed, heads, kv]`, `out [heads, kv, embed]`; feed-forward `wi` (or `wi_0`,
`wi_1`) `[embed, mlp]`, `wo [mlp, embed]`.

Pure functions (params first, config second; `cfg` is static under jit):
  encode, init_decode_state, decode_step, logits, candidate_logits, score, cross_entropy_loss.

Decoding cache (`init_decode_state`): every leaf has leading dim `batch` so a beam search can
gather it; layer axis second.
    self_k, self_v   [batch, layers, max_decode_length, heads, kv]   self-attention KV cache
    cross_k, cross_v [batch, layers, input_length, heads, kv]        computed once per query
    encoder_mask     bool[batch, input_length]                       non-padding input tokens
    index            int32[batch]                                    position of the next token

Voken-only logits (`decode_step(..., voken_logits_only=True)`): column 0 is EOS, column
`1 + j` is token `cfg.first_voken_id + j` (`voken_logit_token_ids(cfg)` gives the mapping).
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avg_jax import partitioning
from avg_jax.models.t5_config import T5Config
from avg_jax.models.t5_layers import (
  MASK_VALUE,
  Attention,
  FeedForward,
  RelativePositionBias,
  RMSNorm,
  dropout,
  normal_init,
)
from avg_jax.vokens import EOS_ID, PAD_ID

__all__ = [
  "T5Config",
  "T5",
  "encode",
  "init_decode_state",
  "decode_step",
  "logits",
  "candidate_logits",
  "sequence_log_probs",
  "score",
  "cross_entropy_loss",
  "shift_right",
  "voken_logit_token_ids",
  "tokens_to_voken_columns",
  "init_variables",
  "init_params",
  "abstract_variables",
  "abstract_params",
  "param_shardings",
  "stack_layer_params",
  "unstack_layer_params",
]

DECODER_START_ID = PAD_ID  # T5 starts decoding from the pad token


# ----------------------------------------------------------------------------------------------
# Layers and stacks
# ----------------------------------------------------------------------------------------------


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and feed-forward blocks with residuals."""

  cfg: T5Config
  deterministic: bool

  @nn.compact
  def __call__(self, x, shared, per_layer):
    """`x [batch, length, embed]`; `shared`: float32 `position_bias [1, heads, length,
    length]` and `mask_bias [batch, 1, 1, length]`, added here rather than once per stack so
    that no `[batch, heads, length, length]` array outlives a layer."""
    del per_layer
    cfg, det = self.cfg, self.deterministic
    h = RMSNorm(cfg, name="pre_attention_norm")(x)
    attn = Attention(cfg, name="attention")
    k, v = attn.key_value(h)
    bias = shared["position_bias"] + shared["mask_bias"]
    x = x + dropout(self, attn(h, k, v, bias, det), cfg.dropout_rate, det)
    h = RMSNorm(cfg, name="pre_mlp_norm")(x)
    x = x + dropout(self, FeedForward(cfg, name="mlp")(h, det), cfg.dropout_rate, det)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention and feed-forward blocks, in one of three modes.

  "full": teacher forcing over a whole target. "cross_kv": only the cross-attention keys and
  values of `shared["encoded"]` (returned per layer). "step": one token against the caches
  in `per_layer`, returning the updated self-attention cache.
  """

  cfg: T5Config
  deterministic: bool
  mode: str = "full"

  @nn.compact
  def __call__(self, x, shared, per_layer):
    cfg, det = self.cfg, self.deterministic
    self_attn = Attention(cfg, name="self_attention")
    cross_attn = Attention(cfg, name="cross_attention")
    if self.mode == "cross_kv":
      k, v = cross_attn.key_value(shared["encoded"])
      return x, {"cross_k": k, "cross_v": v}

    h = RMSNorm(cfg, name="pre_self_attention_norm")(x)
    k, v = self_attn.key_value(h)
    ys = None
    if self.mode == "step":
      # Write this position's key/value into the cache with a one-hot select: no dynamic
      # indices, so it partitions like any elementwise op.
      at = shared["position"][:, :, None, None]  # [batch, max_len, 1, 1]
      k = jnp.where(at, k.astype(per_layer["self_k"].dtype), per_layer["self_k"])
      v = jnp.where(at, v.astype(per_layer["self_v"].dtype), per_layer["self_v"])
      ys = {"self_k": k, "self_v": v}
    x = x + dropout(self, self_attn(h, k, v, shared["self_bias"], det), cfg.dropout_rate, det)

    h = RMSNorm(cfg, name="pre_cross_attention_norm")(x)
    if self.mode == "step":
      ck, cv = per_layer["cross_k"], per_layer["cross_v"]
    else:
      ck, cv = cross_attn.key_value(shared["encoded"])
    x = x + dropout(self, cross_attn(h, ck, cv, shared["cross_bias"], det), cfg.dropout_rate, det)

    h = RMSNorm(cfg, name="pre_mlp_norm")(x)
    x = x + dropout(self, FeedForward(cfg, name="mlp")(h, det), cfg.dropout_rate, det)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), ys


def _run_layers(cfg: T5Config, layer_cls, num_layers: int, x, shared, per_layer, **layer_kwargs):
  """Applies `num_layers` layers as a Python loop or one `nn.scan` (with optional remat).

  `shared` is broadcast to every layer; `per_layer` leaves are `[batch, layers, ...]` and
  layer i sees `[:, i]`; per-layer outputs are stacked the same way. Must be called inside a
  compact method (the layers become children of the caller).
  """
  cls = layer_cls
  if cfg.remat:
    # Under scan the loop body is a single traced function, so CSE cannot undo the remat.
    cls = nn.remat(cls, prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(
      cls,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, 1),
      out_axes=1,
      length=num_layers,
      metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, name="layers", **layer_kwargs)(x, shared, per_layer)
  outputs = []
  for i in range(num_layers):
    layer_in = jax.tree.map(lambda a, i=i: a[:, i], per_layer)
    x, y = cls(cfg, name=f"layers_{i}", **layer_kwargs)(x, shared, layer_in)
    outputs.append(y)
  if outputs and outputs[0] is not None:
    return x, jax.tree.map(lambda *a: jnp.stack(a, axis=1), *outputs)
  return x, None


def _key_mask_bias(mask: jax.Array) -> jax.Array:
  """bool `[batch, kv_length]` -> float32 additive bias `[batch, 1, 1, kv_length]`."""
  return jnp.where(mask, 0.0, MASK_VALUE).astype(jnp.float32)[:, None, None, :]


class Encoder(nn.Module):
  cfg: T5Config
  deterministic: bool

  @nn.compact
  def __call__(self, embedded: jax.Array, mask: jax.Array) -> jax.Array:
    """`embedded [batch, length, embed]`, `mask bool[batch, length]` -> `[batch, length, embed]`."""
    cfg, det = self.cfg, self.deterministic
    length = embedded.shape[1]
    bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(length, length)
    shared = {"position_bias": bias[None], "mask_bias": _key_mask_bias(mask)}
    x = dropout(self, embedded, cfg.dropout_rate, det)
    x, _ = _run_layers(
      cfg, EncoderLayer, cfg.num_encoder_layers, x, shared, None, deterministic=det
    )
    x = RMSNorm(cfg, name="final_norm")(x)
    return dropout(self, x, cfg.dropout_rate, det)


class Decoder(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(
    self,
    x,
    encoded=None,
    encoder_mask=None,
    cache=None,
    *,
    mode: str = "full",
    deterministic: bool = True,
    segment_length: int | None = None,
  ):
    """`mode` (see DecoderLayer) -- full: `x [batch, target_length, embed]` -> same shape
    (after the final norm); with `segment_length` the target is several independent
    sequences of that length laid end to end (self-attention stays inside a segment; all
    attend to the same `encoded`). cross_kv: returns {"cross_k", "cross_v"} `[batch, layers,
    input_length, heads, kv]`. step: `x [batch, 1, embed]` and the decode cache ->
    (`[batch, 1, embed]`, new self KV)."""
    cfg, det = self.cfg, deterministic
    n = cfg.num_decoder_layers
    if mode == "cross_kv":
      _, ys = _run_layers(
        cfg,
        DecoderLayer,
        n,
        jnp.zeros((), cfg.compute_dtype),
        {"encoded": encoded},
        None,
        deterministic=True,
        mode="cross_kv",
      )
      return ys

    relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
    if mode == "full":
      length = x.shape[1]
      causal = jnp.tril(jnp.ones((length, length), bool))
      if segment_length is not None:
        # Within a segment the global offset k - q equals the segment-local one, so the
        # relative-position bias of the whole length is already right; only the mask changes.
        segment = np.arange(length) // int(segment_length)
        causal = causal & jnp.asarray(segment[:, None] == segment[None, :])
      self_bias = relpos(length, length)[None] + jnp.where(causal, 0.0, MASK_VALUE)[None, None]
      shared = {
        "self_bias": self_bias,
        "encoded": encoded,
        "cross_bias": _key_mask_bias(encoder_mask),
      }
      per_layer = None
    else:
      max_len = cache["self_k"].shape[2]
      index = cache["index"]  # [batch]
      table = relpos(max_len, max_len)  # [heads, q, k]
      row = jnp.transpose(jnp.take(table, index, axis=1), (1, 0, 2))  # [batch, heads, k]
      visible = jnp.arange(max_len)[None, :] <= index[:, None]  # [batch, k]
      self_bias = row[:, :, None, :] + _key_mask_bias(visible)  # [batch, heads, 1, k]
      shared = {
        "self_bias": self_bias,
        "cross_bias": _key_mask_bias(cache["encoder_mask"]),
        "position": jnp.arange(max_len)[None, :] == index[:, None],
      }
      per_layer = {k: cache[k] for k in ("self_k", "self_v", "cross_k", "cross_v")}

    x = dropout(self, x, cfg.dropout_rate, det)
    x, ys = _run_layers(cfg, DecoderLayer, n, x, shared, per_layer, deterministic=det, mode=mode)
    x = RMSNorm(cfg, name="final_norm")(x)
    x = dropout(self, x, cfg.dropout_rate, det)
    return x if mode == "full" else (x, ys)


class T5(nn.Module):
  """T5 whose entry points are methods sharing one parameter tree.

  `__call__(input_tokens [batch, in_len], decoder_input_tokens [batch, tgt_len])`: teacher
  forcing (and init) -> logits `[batch, tgt_len, vocab]` float32. `encode(input_tokens)` ->
  encoded. `cross_kv(encoded)` -> cross-attention K/V. `decode_step(token [batch], cache,
  voken_logits_only)` -> (logits, new self K/V); `voken_logits_only` restricts the output
  columns. Use them with `apply(..., method=T5.encode)` etc., or the pure functions below.
  """

  cfg: T5Config
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.token_embedding = self.param(
      "token_embedding",
      nn.with_logical_partitioning(normal_init(1.0), ("vocab", "embed")),
      (cfg.vocab_size, cfg.d_model),
      cfg.storage_dtype,
    )
    if not cfg.tie_embeddings:
      self.output_embedding = self.param(
        "output_embedding",
        nn.with_logical_partitioning(normal_init(cfg.d_model**-0.5), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model),
        cfg.storage_dtype,
      )
    self.encoder = Encoder(cfg, self.deterministic)
    self.decoder = Decoder(cfg)

  def _embed(self, tokens):
    x = jnp.take(self.token_embedding, tokens, axis=0).astype(self.cfg.compute_dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))

  def _output_rows(self):
    """The `[vocab, embed]` matrix of the output projection."""
    return self.token_embedding if self.cfg.tie_embeddings else self.output_embedding

  def _logits(self, x, voken_only: bool):
    cfg = self.cfg
    rows = self._output_rows()
    if voken_only:
      rows = jnp.concatenate([rows[EOS_ID : EOS_ID + 1], rows[cfg.first_voken_id :]], axis=0)
    if cfg.tie_embeddings:
      # T5 v1.0 rescales before the tied projection (the embedding has unit-scale rows).
      x = x * (cfg.d_model**-0.5)
    # float32 results even from bf16 operands: logits feed a softmax over the whole vocabulary.
    out = jnp.einsum(
      "bld,vd->blv", x, rows.astype(cfg.compute_dtype), preferred_element_type=jnp.float32
    )
    return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

  def __call__(self, input_tokens, decoder_input_tokens):
    encoded = self.encode(input_tokens)
    x = self.decoder(
      self._embed(decoder_input_tokens),
      encoded,
      input_tokens != PAD_ID,
      mode="full",
      deterministic=self.deterministic,
    )
    return self._logits(x, False)

  def segments(self, input_tokens, decoder_input_tokens, segment_length: int):
    """Teacher forcing of several targets per input with one encoder pass:
    `decoder_input_tokens [batch, n * segment_length]` holds n targets' decoder inputs end
    to end -> logits `[batch, n * segment_length, vocab]`."""
    encoded = self.encode(input_tokens)
    x = self.decoder(
      self._embed(decoder_input_tokens),
      encoded,
      input_tokens != PAD_ID,
      mode="full",
      deterministic=self.deterministic,
      segment_length=segment_length,
    )
    return self._logits(x, False)

  def encode(self, input_tokens):
    return self.encoder(self._embed(input_tokens), input_tokens != PAD_ID)

  def cross_kv(self, encoded):
    return self.decoder(None, encoded=encoded, mode="cross_kv")

  def decode_step(self, token, cache, voken_logits_only: bool = False):
    x, new_kv = self.decoder(self._embed(token[:, None]), cache=cache, mode="step")
    return self._logits(x, voken_logits_only)[:, 0], new_kv


# ----------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------


def _variables(params: Mapping[str, Any]) -> dict:
  """Accepts either `params` or `{"params": params}`."""
  if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
    return {"params": params["params"]}
  return {"params": params}


def shift_right(target_tokens: jax.Array) -> jax.Array:
  """Decoder inputs for teacher forcing: `[batch, length]` targets shifted right, start 0."""
  start = jnp.full(target_tokens.shape[:-1] + (1,), DECODER_START_ID, target_tokens.dtype)
  return jnp.concatenate([start, target_tokens[..., :-1]], axis=-1)


def _apply(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
  """`model.apply(...)` without `mutable=`: the output alone (flax types apply's result as
  output | (output, state))."""
  return model.apply(*args, **kwargs)


def encode(params, cfg: T5Config, input_tokens: jax.Array) -> jax.Array:
  """`input_tokens int[batch, input_length]` (0 = padding) -> `[batch, input_length, embed]`."""
  return _apply(T5(cfg), _variables(params), input_tokens, method=T5.encode)


def init_decode_state(
  params, cfg: T5Config, encoded: jax.Array, input_tokens: jax.Array, max_decode_length: int
) -> dict:
  """The decoding cache for `encoded [batch, input_length, embed]` (see the module docstring).

  Cross-attention keys/values are computed here, once; `max_decode_length` is the number of
  decoder positions (identifier length + EOS, plus one if the caller feeds a final token).
  """
  cross = _apply(T5(cfg), _variables(params), encoded, method=T5.cross_kv)
  batch = encoded.shape[0]
  shape = (batch, cfg.num_decoder_layers, int(max_decode_length), cfg.num_heads, cfg.d_kv)
  zeros = jnp.zeros(shape, cfg.compute_dtype)
  return {
    "self_k": zeros,
    "self_v": zeros,
    "cross_k": cross["cross_k"],
    "cross_v": cross["cross_v"],
    "encoder_mask": input_tokens != PAD_ID,
    "index": jnp.zeros((batch,), jnp.int32),
  }


def decode_step(
  params, cfg: T5Config, token: jax.Array, cache: dict, *, voken_logits_only: bool = False
) -> tuple[jax.Array, dict]:
  """Feeds `token int[batch]` at position `cache["index"]`; returns raw float32 logits and
  the advanced cache.

  Logits are `[batch, vocab]` (not normalised: apply `log_softmax` for log-probabilities),
  or with `voken_logits_only` `[batch, 1 + num_voken_tokens]`: column 0 is EOS, column 1 + j
  is token `first_voken_id + j` (see `voken_logit_token_ids`); a full-vocabulary
  normalisation is then not available. The first call feeds the start token 0.
  Positions at or beyond `max_decode_length` are not checked (inside jit they cannot be).
  """
  out, new_kv = T5(cfg).apply(
    _variables(params), token, cache, voken_logits_only, method=T5.decode_step
  )
  new_cache = dict(cache)
  new_cache.update(new_kv)
  new_cache["index"] = cache["index"] + 1
  return out, new_cache


def logits(
  params,
  cfg: T5Config,
  input_tokens: jax.Array,
  decoder_target_tokens: jax.Array,
  *,
  deterministic: bool = True,
  rngs: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """Teacher-forced logits `[batch, target_length, vocab]` (float32).

  Decoder inputs are the targets shifted right with start token 0; pass `rngs={"dropout":
  key}` when not deterministic.
  """
  model = T5(cfg, deterministic=deterministic)
  return _apply(
    model, _variables(params), input_tokens, shift_right(decoder_target_tokens), rngs=rngs
  )


def candidate_logits(
  params,
  cfg: T5Config,
  input_tokens: jax.Array,
  candidate_targets: jax.Array,
  *,
  deterministic: bool = True,
  rngs: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """Teacher-forced logits of n targets per input: `input_tokens int[batch, input_length]`,
  `candidate_targets int[batch, n, target_length]` -> `[batch, n, target_length, vocab]`.

  Equal to `logits` on each (input, target) pair, but the encoder runs once per input (its
  dropout mask is shared by the n targets) and the n decoder inputs are packed as segments
  of one sequence, so nothing of the input side is repeated n times.
  """
  b, n, length = candidate_targets.shape
  decoder_inputs = shift_right(candidate_targets).reshape(b, n * length)
  out = _apply(
    T5(cfg, deterministic=deterministic),
    _variables(params),
    input_tokens,
    decoder_inputs,
    length,
    rngs=rngs,
    method=T5.segments,
  )
  return out.reshape(b, n, length, out.shape[-1])


def _target_log_probs(out: jax.Array, target_tokens: jax.Array, temperature: float = 1.0):
  """Log-softmax of `out [batch, len, vocab] / temperature` at the targets: `[batch, len]`."""
  log_probs = jax.nn.log_softmax(out / temperature, axis=-1)
  # One-hot contraction instead of a gather: shards along the `vocab` axis without gathers.
  onehot = jax.nn.one_hot(target_tokens, out.shape[-1], dtype=log_probs.dtype)
  return jnp.sum(log_probs * onehot, axis=-1)


def sequence_log_probs(out: jax.Array, target_tokens: jax.Array) -> jax.Array:
  """Sum over non-padding targets of the full-vocabulary log-softmax: `out [..., len, vocab]`,
  `target_tokens int[..., len]` (zero-padded) -> `[...]`."""
  token_lp = _target_log_probs(out, target_tokens)
  return jnp.sum(jnp.where(target_tokens != PAD_ID, token_lp, 0.0), axis=-1)


def score(
  params,
  cfg: T5Config,
  input_tokens: jax.Array,
  target_tokens: jax.Array,
  *,
  deterministic: bool = True,
  rngs: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
  """`[batch]` sum over non-padding targets of the full-vocabulary log-softmax.

  `target_tokens int[batch, target_length]`, zero-padded (e.g. vokens then EOS).
  """
  out = logits(params, cfg, input_tokens, target_tokens, deterministic=deterministic, rngs=rngs)
  return sequence_log_probs(out, target_tokens)


def cross_entropy_loss(
  params,
  cfg: T5Config,
  input_tokens: jax.Array,
  target_tokens: jax.Array,
  *,
  deterministic: bool = True,
  rngs: Mapping[str, jax.Array] | None = None,
  temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Mean token cross-entropy over non-padding targets (logits / `temperature`).

  Returns `(loss [], num_tokens [])`.
  """
  out = logits(params, cfg, input_tokens, target_tokens, deterministic=deterministic, rngs=rngs)
  token_lp = _target_log_probs(out, target_tokens, temperature)
  weights = (target_tokens != PAD_ID).astype(jnp.float32)
  num = jnp.sum(weights)
  return -jnp.sum(token_lp * weights) / jnp.maximum(num, 1.0), num


def voken_logit_token_ids(cfg: T5Config) -> np.ndarray:
  """`int32[1 + num_voken_tokens]`: the token id of each voken-only logit column."""
  return np.concatenate([[EOS_ID], np.arange(cfg.first_voken_id, cfg.vocab_size)]).astype(np.int32)


def tokens_to_voken_columns(cfg: T5Config, tokens):
  """Token ids -> voken-only logit columns (EOS -> 0, voken -> 1 + offset, others -> -1)."""
  tokens = jnp.asarray(tokens)
  column = tokens - cfg.first_voken_id + 1
  column = jnp.where(tokens >= cfg.first_voken_id, column, -1)
  return jnp.where(tokens == EOS_ID, 0, column).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def init_variables(
  cfg: T5Config, rng: jax.Array, *, input_length: int = 4, target_length: int = 2
) -> dict:
  """Random variables `{"params": ...}` with `nn.LogicallyPartitioned` leaves.

  Use with `partitioning.sharded_init(init_variables, mesh, rng, static=(cfg,))`.
  """
  inputs = jnp.ones((1, input_length), jnp.int32)
  targets = jnp.ones((1, target_length), jnp.int32)
  return dict(T5(cfg).init({"params": rng}, inputs, targets))


def init_params(cfg: T5Config, rng: jax.Array) -> dict:
  """Random unboxed `params` on the default device (one compiled program; for tests, tools).

  Training on a mesh should use `partitioning.sharded_init` with `init_variables` instead.
  """
  return _init_params_jit(cfg, rng)


def _init_params(cfg: T5Config, rng: jax.Array) -> dict:
  return nn.unbox(init_variables(cfg, rng))["params"]


# Module level with the config static: one compile per config and process, not per call.
_init_params_jit = jax.jit(_init_params, static_argnums=0)


@functools.lru_cache(maxsize=16)
def _traced_variables(cfg: T5Config) -> dict:
  return jax.eval_shape(lambda r: init_variables(cfg, r), jax.random.key(0))


def abstract_variables(cfg: T5Config) -> dict:
  """Shapes/dtypes (boxed, with logical names) of `init_variables` without computing them.
  Traced once per config (a whole flax init, ~0.3 s; the stages ask for it many times) and
  handed out as a fresh tree, so a caller's changes never reach the next one."""
  return jax.tree.map(lambda leaf: leaf, _traced_variables(cfg))


def param_shardings(cfg: T5Config, mesh, rules=None) -> dict:
  """`{"params": tree of NamedSharding}` matching `init_variables(cfg, ...)` on `mesh`."""
  specs = nn.get_partition_spec(abstract_variables(cfg))
  return partitioning.logical_to_sharding(specs, mesh, rules)


def abstract_params(cfg: T5Config, mesh) -> tuple[Any, Any]:
  """`(params, shardings)` as training creates them on `mesh`: `jax.ShapeDtypeStruct`s with
  their `NamedSharding`s (restore targets, ahead-of-time compile arguments)."""
  shardings = param_shardings(cfg, mesh)["params"]
  return partitioning.abstract(nn.unbox(abstract_variables(cfg))["params"], shardings), shardings


def _layer_keys(tree: Mapping[str, Any]) -> list[str]:
  keys = [k for k in tree if k.startswith("layers_")]
  return sorted(keys, key=lambda k: int(k.split("_")[1]))


def stack_layer_params(params: Mapping[str, Any]) -> dict:
  """Per-layer `layers_{i}` subtrees -> one `layers` subtree with a leading layer axis."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    keys = _layer_keys(tree)
    if not keys:
      continue
    layers = [tree.pop(k) for k in keys]
    xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(layers)) else jnp
    tree["layers"] = jax.tree.map(lambda *a, xp=xp: xp.stack(a, axis=0), *layers)
    out[stack] = tree
  return out


def unstack_layer_params(params: Mapping[str, Any]) -> dict:
  """Inverse of `stack_layer_params`."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    if "layers" not in tree:
      continue
    layers = tree.pop("layers")
    n = jax.tree.leaves(layers)[0].shape[0]
    for i in range(n):
      tree[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], layers)
    out[stack] = tree
  return out
