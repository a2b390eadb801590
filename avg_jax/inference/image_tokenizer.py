"""The frozen RQ image tokenizer an export carries, to give new images their semantic codes.

    image_tokenizer.save(folder, cfg, params, batch_stats)   # export
    tok = image_tokenizer.load(folder)                       # Retriever
    codes = tok.codes(image_embeddings)                      # float[N, D] -> int32[N, L]

Stored as `rqvae.json` (the `RQVAEConfig`) and `rqvae.npz` (parameters and BatchNorm
statistics, flattened with "/"-joined keys): small, and readable without orbax. Inference
mode (dropout off, BatchNorm running statistics), as `tokenize` assigns identifiers.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from avg_jax.artifacts import io
from avg_jax.errors import UserError
from avg_jax.tokenizer.model import RQVAE, RQVAEConfig

CONFIG = "rqvae.json"
WEIGHTS = "rqvae.npz"


def save(folder: str, cfg: RQVAEConfig, params, batch_stats) -> None:
  os.makedirs(folder, exist_ok=True)
  flat = {
    f"params/{'/'.join(k)}": np.asarray(v)
    for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()
  }
  flat.update(
    {
      f"batch_stats/{'/'.join(k)}": np.asarray(v)
      for k, v in traverse_util.flatten_dict(jax.device_get(batch_stats)).items()
    }
  )
  io.write_npz(os.path.join(folder, WEIGHTS), **flat)
  io.write_json(os.path.join(folder, CONFIG), dataclasses.asdict(cfg))


def _codes(cfg: RQVAEConfig, variables: dict, embeddings: jax.Array) -> jax.Array:
  # flax types apply's result as output | (output, state); without mutable= it is the output.
  return RQVAE(cfg).apply(variables, embeddings, method=RQVAE.codes)  # type: ignore[return-value]


# Module-level with the config static: every load of an export reuses one compile.
_codes_jit = jax.jit(_codes, static_argnums=0)


class ImageTokenizer:
  """Semantic codes of image embeddings with a frozen RQ-VAE."""

  def __init__(self, cfg: RQVAEConfig, variables: dict):
    self.cfg = cfg
    self._variables = jax.tree.map(jnp.asarray, variables)
    self._codes = functools.partial(_codes_jit, cfg)

  def codes(self, embeddings: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """`float[N, in_dim]` -> `int32[N, L]` in fixed-size batches (one compilation)."""
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or x.shape[1] != self.cfg.in_dim:
      raise UserError(
        f"image tokenizer: expected embeddings [N, {self.cfg.in_dim}], got {list(x.shape)}"
      )
    out = []
    for start in range(0, len(x), batch_size):
      rows = x[start : start + batch_size]
      padded = np.zeros((batch_size, x.shape[1]), np.float32)
      padded[: len(rows)] = rows
      out.append(np.asarray(self._codes(self._variables, padded))[: len(rows)])
    return (np.concatenate(out) if out else np.zeros((0, self.cfg.num_levels))).astype(np.int32)


def load(folder: str) -> ImageTokenizer:
  """Reads what `save` wrote; a missing or damaged part is a `UserError` naming it."""
  config_path, weights_path = os.path.join(folder, CONFIG), os.path.join(folder, WEIGHTS)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise UserError(
        f"{path} not found: this export cannot give new images identifiers "
        f"(export it again with an avg or rq tokenizer)"
      )
  try:
    with open(config_path, encoding="utf-8") as f:
      raw = json.load(f)
    cfg = RQVAEConfig(**dict(raw, hidden_dims=tuple(raw["hidden_dims"])))
    with np.load(weights_path) as f:
      flat = {tuple(k.split("/")): f[k] for k in f.files}
  except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
    raise UserError(
      f"{folder}: damaged image tokenizer ({type(e).__name__}: {e}); export again"
    ) from e
  return ImageTokenizer(cfg, traverse_util.unflatten_dict(flat))
