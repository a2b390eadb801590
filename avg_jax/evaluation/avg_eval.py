"""Recall@K of a generator through the constrained beam search (Karpathy protocol).

Every caption of every image of a split is a query; the trie holds that split's images.
Queries are processed in fixed-size global batches (padded at the end) so the search compiles
once; each process feeds its slice of every batch and all processes see all results.
"""

import time
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from avg_jax import partitioning
from avg_jax.data import dataset
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.trie import VokenTrie
from avg_jax.evaluation.recall import recall_at_k
from avg_jax.progress import progress


def query_set(workdir: str, split: str, tokenizer: TextTokenizer, max_length: int,
              max_queries: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`(input tokens int32[Q, S], true image ids int64[Q])` for the split's captions.

  `max_queries > 0` keeps the first captions of the first images (whole images first).
  """
  image_ids, texts = dataset.read_texts(workdir, split)
  if max_queries:
    image_ids, texts = image_ids[:max_queries], texts[:max_queries]
  return tokenizer.encode_batch(texts, max_length), image_ids


def build_trie(table: dict, split: str, vocab) -> VokenTrie:
  """The prefix tree over a split's images (`table[split] = (image_ids, codes)`)."""
  image_ids, codes = table[split]
  return VokenTrie.build(codes, image_ids, position_sizes=vocab.position_sizes())


def _global_batch_size(requested: int, mesh) -> int:
  data_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  return max(data_devices, (requested // data_devices) * data_devices)


def run_search(search_fn, params: Any, device_trie: Any, inputs: np.ndarray, *, mesh,
               batch_size: int, desc: str = "search") -> tuple[dict, tuple[float, int]]:
  """Runs `search_fn` over all `inputs [Q, S]` in padded global batches.

  Returns (numpy results for the Q queries, (seconds, queries searched in them)); the first
  batch runs once more beforehand so compilation is not timed.
  """
  batch = _global_batch_size(batch_size, mesh)
  q = inputs.shape[0]
  padded = np.concatenate([inputs, np.zeros(((-q) % batch, inputs.shape[1]), inputs.dtype)])
  pc, pi = jax.process_count(), jax.process_index()
  if batch % pc:
    raise ValueError(f"search batch {batch} does not divide over {pc} processes")
  local = batch // pc

  def one(rows):
    tokens = partitioning.shard_host_batch(rows[pi * local:(pi + 1) * local], mesh)
    result = search_fn(params, device_trie, tokens)
    if pc > 1:
      result = multihost_utils.process_allgather(result, tiled=True)
    return search_lib.results_to_numpy(result)

  one(padded[:batch])  # compile
  outs = []
  start = time.perf_counter()
  for b in progress(range(0, padded.shape[0], batch), total=padded.shape[0] // batch,
                    desc=desc, unit="batch"):
    outs.append(one(padded[b:b + batch]))
  elapsed = time.perf_counter() - start
  merged = {k: np.concatenate([o[k] for o in outs])[:q] for k in outs[0]}
  return merged, (elapsed, int(padded.shape[0]))


def make_eval_search_fn(gen, mesh, param_shardings: Any, config):
  """The jitted search `evaluate_recall` uses (build once, reuse across evaluations)."""
  k = max(max(config.evaluate.recall_ks), int(config.decode.top_k))
  beam = max(int(config.decode.beam_size), k)
  return search_lib.make_search_fn(gen.cfg, gen.vocab, mesh, param_shardings, beam_size=beam,
                                   top_k=k, mask_mode=config.decode.mask_mode,
                                   voken_logits_only=bool(config.decode.voken_logits_only))


def evaluate_recall(gen, params: Any, param_shardings: Any, mesh, config, workdir: str,
                    split: str, *, max_queries: int = 0,
                    search_fn: Optional[Any] = None) -> dict:
  """`{"R@1", "R@5", "R@10", "queries_per_s", "num_queries"}` of `params` on `split`."""
  inputs, true_ids = query_set(workdir, split, gen.tokenizer,
                               int(config.text_tokenizer.max_length), max_queries)
  trie = build_trie(gen.table, split, gen.vocab)
  if search_fn is None:
    search_fn = make_eval_search_fn(gen, mesh, param_shardings, config)
  device_trie = trie.to_device(dense_levels=int(config.decode.dense_levels),
                               sharding=partitioning.replicated(mesh))
  results, (seconds, timed) = run_search(search_fn, params, device_trie, inputs, mesh=mesh,
                                         batch_size=int(config.decode.batch_size),
                                         desc=f"search {split}")
  metrics = recall_at_k(results["item_ids"], true_ids, tuple(config.evaluate.recall_ks))
  metrics["num_queries"] = int(inputs.shape[0])
  metrics["queries_per_s"] = timed / max(seconds, 1e-9)
  metrics["_results"] = results
  metrics["_true_ids"] = true_ids
  return metrics
