"""Voken rows of the embedding / output matrices, initialised from the RQ codebook.

AVG appends `vocab.num_voken_tokens` rows after the text vocabulary (layout: avg_jax/vokens.py)
and overwrites the level-token rows with the codebook (docs/design.md, "Vokens"). Choices made here:

- Level-token rows: the codebook rows, in level-token order. When `e_dim != d_model` the
  codebook is multiplied by a fixed, seeded projection `[e_dim, d_model]` with orthonormal
  rows (e_dim <= d_model: an exact isometry, inner products and distances are kept) or
  orthonormal columns scaled by sqrt(e_dim / d_model) (e_dim > d_model: a Johnson-Lindenstrauss
  projection that keeps squared norms in expectation).
- Disambiguation rows (no codebook vector exists for them), and every voken row with
  `init="random"`: normal with the standard deviation of the matrix's text rows.
- Untied output matrix (T5 v1.1): the same rows times d_model**-0.5, so a voken's logit
  equals what the tied model (which rescales its input by d_model**-0.5) would give.
"""

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from avg_jax.errors import UserError
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import VokenVocabulary

VOKEN_INITS = ("codebook", "random")


def codebook_projection(e_dim: int, d_model: int, seed: int = 0) -> np.ndarray:
  """The fixed `float32[e_dim, d_model]` projection described in the module docstring."""
  rng = np.random.default_rng(seed)
  if e_dim <= d_model:
    q, _ = np.linalg.qr(rng.standard_normal((d_model, e_dim)))  # orthonormal columns
    return q.T.astype(np.float32)  # orthonormal rows
  q, _ = np.linalg.qr(rng.standard_normal((e_dim, d_model)))
  return (q * np.sqrt(e_dim / d_model)).astype(np.float32)


def voken_rows(
  vocab: VokenVocabulary,
  d_model: int,
  codebook: np.ndarray | None,
  *,
  text_rows_std: float,
  init: str = "codebook",
  seed: int = 0,
) -> np.ndarray:
  """`float32[num_voken_tokens, d_model]` initial voken embedding rows.

  `codebook float[num_level_tokens, e_dim]` (rows in level-token order); `text_rows_std` is
  the standard deviation of the existing text rows (scale of the random rows).
  """
  if init not in VOKEN_INITS:
    raise UserError(f"t5.voken_init: {init!r} is not one of {', '.join(VOKEN_INITS)}")
  rng = np.random.default_rng(seed + 1)
  rows = (rng.standard_normal((vocab.num_voken_tokens, d_model)) * text_rows_std).astype(np.float32)
  if init == "codebook":
    if codebook is None:
      raise UserError("t5.voken_init is 'codebook' but no codebook was given")
    codebook = np.asarray(codebook, np.float32)
    if codebook.ndim != 2 or codebook.shape[0] != vocab.num_level_tokens:
      raise UserError(
        f"codebook: expected shape [{vocab.num_level_tokens}, e_dim] "
        f"(num_level_tokens rows), got {list(codebook.shape)}"
      )
    level = codebook
    if codebook.shape[1] != d_model:
      level = codebook @ codebook_projection(codebook.shape[1], d_model, seed)
    rows[: vocab.num_level_tokens] = level
  return rows


def append_rows(
  params: Mapping[str, Any],
  cfg: T5Config,
  input_rows: np.ndarray,
  output_rows: np.ndarray | None = None,
) -> tuple[T5Config, dict]:
  """Appends rows to `token_embedding` (and `output_embedding` when untied).

  `cfg` describes `params`; returns the config with `num_voken_tokens` grown by the number
  of rows, and the new params (host numpy for the changed matrices).
  """
  input_rows = np.asarray(input_rows)
  n = input_rows.shape[0]
  emb = np.asarray(params["token_embedding"])
  if emb.shape[0] != cfg.vocab_size or input_rows.shape[1:] != emb.shape[1:]:
    raise UserError(
      f"token_embedding: shape {list(emb.shape)} does not match the config "
      f"(vocab {cfg.vocab_size}) or the new rows {list(input_rows.shape)}"
    )
  out = dict(params)
  out["token_embedding"] = np.concatenate([emb, input_rows.astype(emb.dtype)], axis=0)
  if not cfg.tie_embeddings:
    if output_rows is None or np.shape(output_rows) != input_rows.shape:
      raise UserError("untied T5: output rows of the same shape as the input rows are required")
    lm = np.asarray(params["output_embedding"])
    out["output_embedding"] = np.concatenate([lm, np.asarray(output_rows, lm.dtype)], axis=0)
  new_cfg = cfg.replace(vocab_size=cfg.vocab_size + n, num_voken_tokens=cfg.num_voken_tokens + n)
  return new_cfg, out


def _std(matrix, rows: int) -> float:
  # jnp for jax arrays: works on sharded (even multi-host) arrays without a host gather.
  xp = np if isinstance(matrix, np.ndarray) else jnp
  return float(xp.std(matrix[:rows].astype(xp.float32)))


def _rows_for(params, cfg, vocab, codebook, init, seed, text_rows):
  """(input rows, output rows or None) for the voken block."""
  emb_std = _std(params["token_embedding"], text_rows)
  rows = voken_rows(vocab, cfg.d_model, codebook, text_rows_std=emb_std, init=init, seed=seed)
  if cfg.tie_embeddings:
    return rows, None
  if init == "codebook":
    out_rows = rows * np.float32(cfg.d_model**-0.5)
    # Disambiguation rows are random: give them the output matrix's own scale instead.
    lm_std = _std(params["output_embedding"], text_rows)
    d = vocab.num_level_tokens
    out_rows[d:] = rows[d:] * np.float32(lm_std / max(emb_std, 1e-12))
  else:
    lm_std = _std(params["output_embedding"], text_rows)
    out_rows = voken_rows(
      vocab, cfg.d_model, None, text_rows_std=lm_std, init="random", seed=seed + 7
    )
  return rows, out_rows


def append_voken_rows(
  params: Mapping[str, Any],
  cfg: T5Config,
  vocab: VokenVocabulary,
  codebook: np.ndarray | None,
  *,
  init: str = "codebook",
  seed: int = 0,
) -> tuple[T5Config, dict]:
  """Text-only `params` (e.g. imported from Hugging Face) -> params with voken rows appended.

  `cfg` is the text-only config (`vocab_size == vocab.text_vocab_size`, no voken rows);
  returns `(cfg with num_voken_tokens, params)`.
  """
  if cfg.num_voken_tokens or cfg.vocab_size != vocab.text_vocab_size:
    raise UserError(
      f"append_voken_rows: the model has {cfg.vocab_size} rows "
      f"({cfg.num_voken_tokens} voken rows) but the voken vocabulary expects a "
      f"text-only model with {vocab.text_vocab_size} rows"
    )
  rows, out_rows = _rows_for(params, cfg, vocab, codebook, init, seed, cfg.vocab_size)
  return append_rows(params, cfg, rows, out_rows)


def set_voken_rows(
  params: Mapping[str, Any],
  cfg: T5Config,
  vocab: VokenVocabulary,
  codebook: np.ndarray | None,
  *,
  init: str = "codebook",
  seed: int = 0,
) -> dict:
  """Overwrites the voken rows of params that already have them (e.g. a random init).

  Works on numpy or (sharded) jax arrays; the result has the input's array type.
  """
  if cfg.num_voken_tokens != vocab.num_voken_tokens or cfg.first_voken_id != vocab.first_voken_id:
    raise UserError(
      f"set_voken_rows: model voken rows [{cfg.first_voken_id}, "
      f"{cfg.vocab_size}) do not match the voken vocabulary "
      f"[{vocab.first_voken_id}, {vocab.total_vocab_size})"
    )
  rows, out_rows = _rows_for(params, cfg, vocab, codebook, init, seed, cfg.first_voken_id)
  out = dict(params)

  def put(matrix, new_rows):
    if isinstance(matrix, np.ndarray):
      matrix = matrix.copy()
      matrix[cfg.first_voken_id :] = new_rows
      return matrix
    return matrix.at[cfg.first_voken_id :].set(jnp.asarray(new_rows, matrix.dtype))

  out["token_embedding"] = put(params["token_embedding"], rows)
  if out_rows is not None:
    out["output_embedding"] = put(params["output_embedding"], out_rows)
  return out
