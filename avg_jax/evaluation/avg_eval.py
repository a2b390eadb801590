"""Recall@K of a generator through the constrained beam search (Karpathy protocol).

Every caption of every image of a split is a query; the trie holds that split's images (one
index). Queries are processed in fixed-size global batches (padded at the end) so the search
compiles once; each process feeds its slice of every batch and all processes see all results.
With `decode.tie_break="similarity"` the search also takes each caption's dual-encoder
embedding, and the index the images' (both from the embed stage's files).
"""

import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from avg_jax import partitioning
from avg_jax.artifacts import embeddings
from avg_jax.data import dataset
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import DeviceTrie
from avg_jax.evaluation.recall import code_recall_at_k, recall_at_k
from avg_jax.progress import progress


def query_set(
  workdir: str, split: str, tokenizer: TextTokenizer, max_length: int, max_queries: int = 0
) -> tuple[np.ndarray, np.ndarray]:
  """`(input tokens int32[Q, S], true image ids int64[Q])` for the split's captions.

  `max_queries > 0` keeps the first captions of the first images (whole images first).
  """
  image_ids, texts = dataset.read_texts(workdir, split)
  if max_queries:
    image_ids, texts = image_ids[:max_queries], texts[:max_queries]
  return tokenizer.encode_batch(texts, max_length), image_ids


def device_index(gen, splits, mesh, decode: DecodeConfig, workdir: str) -> DeviceTrie:
  """The generator's trie over the images of `splits` on the mesh (replicated), with the
  images' dual-encoder embeddings when the tie-break needs them."""
  trie = gen.trie(splits)
  item_embeddings = None
  if decode.needs_embeddings:
    parts = [embeddings.load(workdir, s) for s in splits]
    item_embeddings = (
      np.concatenate([p["image_ids"] for p in parts]),
      np.concatenate([p["image_emb"] for p in parts]),
    )
  return trie.to_device(
    dense_levels=decode.dense_levels,
    sharding=partitioning.replicated(mesh),
    item_embeddings=item_embeddings,
  )


def query_embeddings(workdir: str, split: str, max_queries: int = 0) -> np.ndarray:
  """`float32[Q, D]` dual-encoder embeddings of the split's captions (query_set order)."""
  emb = embeddings.load(workdir, split)["caption_emb"]
  return emb[:max_queries] if max_queries else emb


def _global_batch_size(requested: int, mesh) -> int:
  data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return max(data_devices, (requested // data_devices) * data_devices)


def run_search(
  search_fn,
  params: Any,
  device_trie: Any,
  inputs: np.ndarray,
  *,
  mesh,
  batch_size: int,
  desc: str = "search",
  query_emb: np.ndarray | None = None,
) -> tuple[dict, tuple[float, int]]:
  """Runs `search_fn` over all `inputs [Q, S]` (and `query_emb [Q, D]`) in padded global
  batches.

  Returns (numpy results for the Q queries, (seconds, queries searched in them)); the first
  batch runs once more beforehand so compilation is not timed.
  """
  batch = _global_batch_size(batch_size, mesh)
  q = inputs.shape[0]
  pad = lambda x: np.concatenate([x, np.zeros(((-q) % batch,) + x.shape[1:], x.dtype)])
  padded = pad(inputs)
  padded_emb = None if query_emb is None else pad(np.asarray(query_emb, np.float32))
  pc, pi = jax.process_count(), jax.process_index()
  if batch % pc:
    raise ValueError(f"search batch {batch} does not divide over {pc} processes")
  local = batch // pc

  def one(start):
    rows = slice(start + pi * local, start + (pi + 1) * local)
    tokens = partitioning.shard_host_batch(padded[rows], mesh)
    if padded_emb is None:
      result = search_fn(params, device_trie, tokens)
    else:
      result = search_fn(
        params, device_trie, tokens, partitioning.shard_host_batch(padded_emb[rows], mesh)
      )
    if pc > 1:
      result = multihost_utils.process_allgather(result, tiled=True)
    return search_lib.results_to_numpy(result)

  one(0)  # compile
  outs = []
  start = time.perf_counter()
  for b in progress(
    range(0, padded.shape[0], batch), total=padded.shape[0] // batch, desc=desc, unit="batch"
  ):
    outs.append(one(b))
  elapsed = time.perf_counter() - start
  merged = {k: np.concatenate([o[k] for o in outs])[:q] for k in outs[0]}
  return merged, (elapsed, int(padded.shape[0]))


def eval_decode(config) -> DecodeConfig:
  """The decode settings of evaluation: `config.decode`, k raised to the largest recall K."""
  return DecodeConfig.from_config(config.decode, config.evaluate.recall_ks)


def make_eval_search_fn(gen, mesh, param_shardings: Any, decode: DecodeConfig, query_head=None):
  """The jitted search `evaluate_recall` uses (build once, reuse across evaluations) under
  `decode` (`eval_decode`) for `gen`'s trained length; `query_head`: avg_hybrid's query
  embeddings from the generator (`models.query_head`)."""
  return search_lib.make_search_fn(
    gen.cfg,
    gen.vocab,
    mesh,
    param_shardings,
    decode.for_generator(gen.trained_length),
    query_head=query_head,
  )


def evaluate_recall(
  gen,
  params: Any,
  param_shardings: Any,
  mesh,
  config,
  workdir: str,
  split: str,
  *,
  max_queries: int = 0,
  search_fn: Any | None = None,
  query_head: Any = None,
  decode: DecodeConfig | None = None,
) -> dict:
  """Recall of `params` on `split`: image-level `R@K` (the image must be retrieved) and the
  paper's code-level `code R@K` (a generated sequence carries its semantic codes), plus
  `queries_per_s` and `num_queries`. `decode`: the search settings (default `eval_decode`)."""
  d = eval_decode(config) if decode is None else decode
  ks = tuple(int(k) for k in config.evaluate.recall_ks)
  inputs, true_ids = query_set(
    workdir, split, gen.tokenizer, int(config.text_tokenizer.max_length), max_queries
  )
  if search_fn is None:
    search_fn = make_eval_search_fn(gen, mesh, param_shardings, d, query_head)
  device_trie = device_index(gen, [split], mesh, d, workdir)
  query_emb = query_embeddings(workdir, split, max_queries) if d.needs_text_tower else None
  results, (seconds, timed) = run_search(
    search_fn,
    params,
    device_trie,
    inputs,
    mesh=mesh,
    batch_size=d.batch_size,
    desc=f"search {split}",
    query_emb=query_emb,
  )
  # Recall values, plus the raw results under "_" keys for the callers that need them.
  metrics: dict[str, Any] = dict(recall_at_k(results["item_ids"], true_ids, ks))
  image_ids, codes = gen.table[split]
  row_of = {int(i): r for r, i in enumerate(image_ids)}
  true_codes = codes[[row_of[int(i)] for i in true_ids], : gen.vocab.num_levels]
  metrics.update(code_recall_at_k(results["sequences"], true_codes, ks))
  metrics["num_queries"] = int(inputs.shape[0])
  metrics["queries_per_s"] = timed / max(seconds, 1e-9)
  metrics["_results"] = results
  metrics["_true_ids"] = true_ids
  return metrics


def eval_fn_for(
  config: ConfigDict,
  workdir: str,
  gen,
  mesh,
  param_shardings,
  method: str,
  max_queries: int,
):
  """`state -> metrics` of validation Recall@K (the search compiled once), for the train and
  rank stages' loops (`gen`: a `training.generator.Generator`)."""
  search_fn = make_eval_search_fn(gen, mesh, param_shardings, eval_decode(config))

  def eval_fn(s):
    m = evaluate_recall(
      gen,
      s.params,
      param_shardings,
      mesh,
      config,
      workdir,
      "val",
      max_queries=max_queries,
      search_fn=search_fn,
    )
    return {
      "split": "val",
      "method": method,
      "protocol": gen.protocol,
      **{k: v for k, v in m.items() if not k.startswith("_")},
    }

  return eval_fn
