"""Residual vector quantisation as pure functions: assignment, straight-through sum, losses.

Codebooks are one array `[C, K, D]`: `C = 1` when one codebook is applied at every level (the
reference) or `C = L` for one codebook per level. Level `l` reads codebook `min(l, C - 1)`.

Gradient flow follows the reference RQ-VAE exactly:
  * per level, `codebook loss = mean((q - sg(r))^2)` trains the codewords and
    `commitment = mean((sg(q) - r)^2)` pulls the encoder output towards them (weight beta);
  * the residual handed to the next level is `sg(r - q)` (the reference subtracts the
    straight-through value, whose gradient cancels), so only level 0's commitment term reaches
    the encoder while every level's codebook term trains its codewords;
  * the quantised vector is `x + sg(sum(q) - x)`: its value is the sum of the chosen codewords,
    its gradient with respect to `x` is the identity (straight-through estimator).
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class RQOutput:
  """What `residual_quantize` returns (B = batch, L = levels, D = code_dim)."""

  quantized: jax.Array  # [B, D] straight-through sum of the chosen codewords
  codes: jax.Array  # int32[B, L]
  quant_loss: jax.Array  # [] codebook + beta * commitment, averaged over levels
  residuals: jax.Array  # [L, B, D] the input of each level (level 0: x itself)
  errors: jax.Array  # [L, B] squared distance of each level's input to its codeword


def codebook_index(level: int, num_codebooks: int) -> int:
  """Which of the `num_codebooks` codebooks level `level` uses."""
  return 0 if num_codebooks == 1 else level


def squared_distances(
  x: jax.Array, codebook: jax.Array, *, precision: jax.lax.Precision | None = None
) -> jax.Array:
  """`[B, D]`, `[K, D]` -> `[B, K]` squared L2 distances (clipped at 0 against rounding)."""
  x_sq = jnp.sum(x * x, axis=-1, keepdims=True)  # [B, 1]
  c_sq = jnp.sum(codebook * codebook, axis=-1)  # [K]
  dots = jnp.matmul(x, codebook.T, precision=precision)  # [B, K]
  return jnp.maximum(x_sq - 2.0 * dots + c_sq[None, :], 0.0)


def nearest_code(
  x: jax.Array, codebook: jax.Array, *, precision: jax.lax.Precision | None = None
) -> tuple[jax.Array, jax.Array]:
  """Nearest codeword: `x [B, D]`, `codebook [K, D]` -> (codes int32[B], sq_dist [B]).

  The argmin drops `||x||^2` (constant per row): one matmul and one add per level.
  """
  c_sq = jnp.sum(codebook * codebook, axis=-1)  # [K]
  scores = c_sq[None, :] - 2.0 * jnp.matmul(x, codebook.T, precision=precision)  # [B, K]
  codes = jnp.argmin(scores, axis=-1).astype(jnp.int32)  # [B]
  best = jnp.take_along_axis(scores, codes[:, None], axis=-1)[:, 0]  # [B]
  sq_dist = jnp.maximum(best + jnp.sum(x * x, axis=-1), 0.0)  # [B]
  return codes, sq_dist


def residual_quantize(
  x: jax.Array,
  codebooks: jax.Array,
  num_levels: int,
  *,
  beta: float = 0.25,
  precision: jax.lax.Precision | None = None,
) -> RQOutput:
  """Quantises `x [B, D]` with `codebooks [C, K, D]` over `num_levels` residual levels."""
  num_codebooks = codebooks.shape[0]
  if num_codebooks not in (1, num_levels):
    raise ValueError(f"codebooks: expected 1 or {num_levels} codebooks, got {num_codebooks}")
  sg = jax.lax.stop_gradient
  residual = x
  total = jnp.zeros_like(x)
  codes, losses, residuals, errors = [], [], [], []
  for level in range(num_levels):
    codebook = codebooks[codebook_index(level, num_codebooks)]  # [K, D]
    level_codes, sq_dist = nearest_code(sg(residual), sg(codebook), precision=precision)
    q = jnp.take(codebook, level_codes, axis=0)  # [B, D]
    codebook_loss = jnp.mean(jnp.square(q - sg(residual)))
    commitment = jnp.mean(jnp.square(sg(q) - residual))
    losses.append(codebook_loss + beta * commitment)
    residuals.append(residual)
    errors.append(sq_dist)
    codes.append(level_codes)
    total = total + sg(q)
    residual = sg(residual - q)
  quantized = x + sg(total - x)
  return RQOutput(
    quantized=quantized,
    codes=jnp.stack(codes, axis=-1),
    quant_loss=jnp.mean(jnp.stack(losses)),
    residuals=sg(jnp.stack(residuals)),
    errors=jnp.stack(errors),
  )


def quantize_codes(
  x: jax.Array, codebooks: jax.Array, num_levels: int, *, precision: jax.lax.Precision | None = None
) -> jax.Array:
  """Only the codes: `x [B, D]` -> int32[B, L] (inference; no losses, no gradients)."""
  num_codebooks = codebooks.shape[0]
  residual = x
  codes = []
  for level in range(num_levels):
    codebook = codebooks[codebook_index(level, num_codebooks)]
    level_codes, _ = nearest_code(residual, codebook, precision=precision)
    residual = residual - jnp.take(codebook, level_codes, axis=0)
    codes.append(level_codes)
  return jnp.stack(codes, axis=-1)


def decode_codes(codes: jax.Array, codebooks: jax.Array) -> jax.Array:
  """`codes int[B, L]` -> `[B, D]` sum of the chosen codewords."""
  num_codebooks = codebooks.shape[0]
  total = jnp.zeros((codes.shape[0], codebooks.shape[-1]), codebooks.dtype)
  for level in range(codes.shape[-1]):
    total = total + jnp.take(
      codebooks[codebook_index(level, num_codebooks)], codes[:, level], axis=0
    )
  return total


# --- Codebook usage -----------------------------------------------------------------------------


def code_counts(
  codes: jax.Array | np.ndarray, codebook_size: int, weights: jax.Array | None = None
) -> jax.Array:
  """`codes int[N, L]` -> `[L, K]` how often each code is chosen at each level.

  `weights [N]` (e.g. 0 for padding rows) scales each row's contribution.
  """
  n, num_levels = codes.shape
  w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  # A scatter-add, not a [N, L, K] one-hot: the batch can be large and K is 1024.
  flat = (jnp.arange(num_levels)[None, :] * codebook_size + codes).reshape(-1)  # [N * L]
  counts = (
    jnp.zeros((num_levels * codebook_size,), jnp.float32).at[flat].add(jnp.repeat(w, num_levels))
  )
  return counts.reshape(num_levels, codebook_size)


def perplexity(counts: jax.Array) -> jax.Array:
  """`[L, K]` counts -> `[L]` exp(entropy) of each level's code distribution (K when uniform)."""
  probs = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1e-12)
  entropy = -jnp.sum(
    jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1
  )
  return jnp.exp(entropy)


def unused_share(counts: jax.Array) -> jax.Array:
  """`[L, K]` counts -> `[L]` share of codewords never chosen at that level."""
  return jnp.mean((counts == 0).astype(jnp.float32), axis=-1)


# --- Dead-code restart --------------------------------------------------------------------------


def restart_dead_codes(
  codebooks: jax.Array, last_used: jax.Array, step: jax.Array, out: RQOutput, *, dead_after: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Replaces codewords unused for `dead_after` steps by the batch's worst-quantised inputs.

  `codebooks [C, K, D]`, `last_used int32[C, K]` (step each codeword was last chosen), `out` the
  batch's `RQOutput`. A dead codeword of codebook `c` becomes one of the residual inputs of the
  levels using `c` with the largest quantisation error (the largest first), so it is chosen at
  once by the input that needed it most. Returns `(codebooks, last_used, num_restarted [])`.
  The optimiser's moments for a restarted row are left as they are (they decay within a few
  hundred steps at Adam's default betas).
  """
  num_codebooks, k, _ = codebooks.shape
  num_levels = out.codes.shape[-1]
  new_books, new_last, restarted = [], [], jnp.zeros((), jnp.int32)
  for c in range(num_codebooks):
    levels = [lv for lv in range(num_levels) if codebook_index(lv, num_codebooks) == c]
    level_codes = jnp.concatenate([out.codes[:, lv] for lv in levels])  # [n]
    candidates = jnp.concatenate([out.residuals[lv] for lv in levels], axis=0)  # [n, D]
    cand_errors = jnp.concatenate([out.errors[lv] for lv in levels], axis=0)  # [n]
    used = jnp.zeros((k,), jnp.bool_).at[level_codes].set(True)  # [K]
    last = jnp.where(used, step, last_used[c])  # [K]
    dead = (step - last) >= dead_after  # [K]
    num_candidates = min(k, candidates.shape[0])
    _, worst = jax.lax.top_k(cand_errors, num_candidates)  # [n']
    # The i-th dead codeword (in index order) takes the i-th worst input (wrapping around).
    rank = (jnp.cumsum(dead) - 1) % num_candidates  # [K]
    replacement = jnp.take(candidates, jnp.take(worst, rank), axis=0)  # [K, D]
    new_books.append(jnp.where(dead[:, None], replacement, codebooks[c]))
    new_last.append(jnp.where(dead, step, last))
    restarted = restarted + jnp.sum(dead)
  return jnp.stack(new_books), jnp.stack(new_last), restarted
