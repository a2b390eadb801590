"""Fitting avg_hybrid's query head (`models.query_head`) for a trained generator.

Features: the generator's mean-pooled encoder states of the training captions; targets: the
dual encoder's embeddings of the same captions (`embeddings_train.npz`, in `read_texts`
order). The fit is closed form and deterministic, so `evaluate` and `export` each compute it
from the same inputs instead of handing a file to each other.
"""

import functools

import jax
import numpy as np

from avg_jax import partitioning
from avg_jax.artifacts import embeddings
from avg_jax.data import dataset
from avg_jax.models import query_head as query_head_lib
from avg_jax.models import t5 as t5_lib
from avg_jax.progress import progress


def _pooled_encoder_states(cfg, params, tokens):
  return query_head_lib.pooled_states(t5_lib.encode(params, cfg, tokens), tokens)


def encoder_features(params, cfg, tokens: np.ndarray, mesh, batch_size: int = 256) -> np.ndarray:
  """`float32[N, d_model]`: mean-pooled encoder states of `tokens int32[N, S]`, in fixed
  batches (one compilation; the last batch is padded with empty rows and cut)."""
  rows = -(-max(1, batch_size) // mesh.size) * mesh.size
  # Replicated output: every process reads the whole result (multi-process runs too).
  jitted = jax.jit(
    _pooled_encoder_states, static_argnums=0, out_shardings=partitioning.replicated(mesh)
  )
  fn = functools.partial(jitted, cfg)
  out = []
  with partitioning.activation_context(mesh):
    for start in progress(
      range(0, len(tokens), rows),
      total=-(-len(tokens) // rows),
      desc="query head: encode captions",
      unit="batch",
    ):
      chunk = np.asarray(tokens[start : start + rows], np.int32)
      padded = np.zeros((rows, tokens.shape[1]), np.int32)
      padded[: len(chunk)] = chunk
      out.append(np.asarray(fn(params, padded))[: len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, cfg.d_model), np.float32)


def caption_tokens(workdir: str, split: str, tokenizer, max_length: int) -> np.ndarray:
  """`int32[N, max_length]` the split's captions (`read_texts` order) as generator input."""
  _, texts = dataset.read_texts(workdir, split)
  return tokenizer.encode_batch(texts, max_length)


def fit_query_head(gen, params, mesh, workdir: str, config) -> query_head_lib.QueryHead:
  """The head of `gen` / `params` (a trained generator), fitted on the training captions
  with `config.decode.query_head_l2`."""
  tokens = caption_tokens(workdir, "train", gen.tokenizer, int(config.text_tokenizer.max_length))
  targets = embeddings.load(workdir, "train")["caption_emb"]
  features = encoder_features(params, gen.cfg, tokens, mesh)
  return query_head_lib.fit(features, targets, float(config.decode.query_head_l2))
