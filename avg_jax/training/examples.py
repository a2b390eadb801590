"""A generator's training examples and the batches that feed its train step.

Examples are (query tokens, target tokens) pairs: every caption of every training image, and
under the transductive protocol (`config.protocol`) every pseudo query of the indexed (val /
test) images, `train.pseudo_query_repeats` times, with the identifier of its image in its own
split's index; with `train.pseudo_queries_of_training_images`, the training images' pseudo
queries too (either protocol). Batches come from grain (avg_jax.data.pipeline), sharded over the
mesh.
"""

import logging
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from ml_collections import ConfigDict

from avg_jax import partitioning
from avg_jax.data import dataset, pipeline
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.errors import UserError

log = logging.getLogger(__name__)


class Examples:
  """Random access to tokenized examples: index -> {"inputs": int32[S], "targets": int32[T]}
  (rows of two arrays; a grain source, picklable for workers)."""

  def __init__(self, inputs: np.ndarray, targets: np.ndarray):
    self.inputs, self.targets = inputs, targets

  def __len__(self) -> int:
    return len(self.inputs)

  def __getitem__(self, index: int) -> dict:
    return {"inputs": self.inputs[index], "targets": self.targets[index]}


def pseudo_examples(
  workdir: str, gen, repeats: int, of_training_images: bool = False
) -> tuple[np.ndarray, list[str]]:
  """The extra examples: `(image ids [M], M pseudo queries)` of the indexed val / test images
  (transductive protocol) and, with `of_training_images`, of the training images (either
  protocol), each `repeats` times."""
  indexed = [s for s in gen.training_splits() if s != "train" or of_training_images]
  if not indexed:
    return np.zeros((0,), np.int64), []
  image_ids = np.concatenate([gen.table[s][0] for s in indexed])
  ids, queries = pseudo_lib.of_images(workdir, image_ids)
  if not queries:
    log.warning(
      "the prepared data has no pseudo queries for the %s images: training sees "
      "the training captions only",
      "/".join(indexed),
    )
  return np.tile(ids, repeats), queries * repeats


def training_source(config: ConfigDict, workdir: str, gen) -> grain.MapDataset:
  """Every (caption or pseudo query, target) example the protocol trains on: the training
  captions in caption order, then the pseudo queries. All texts are tokenized here in one
  call: a per-example tokenizer call costs more CPU than a train step of the smoke model."""
  ids, target_parts = zip(*(gen.targets(s) for s in gen.training_splits()))
  row_of = {int(i): r for r, i in enumerate(np.concatenate(ids))}
  targets = np.concatenate(target_parts)
  caption_ids, texts = dataset.read_texts(workdir, "train")
  pseudo_ids, queries = pseudo_examples(
    workdir,
    gen,
    int(config.train.pseudo_query_repeats),
    bool(config.train.pseudo_queries_of_training_images),
  )
  example_ids = np.concatenate([caption_ids, pseudo_ids])
  inputs = gen.tokenizer.encode_batch(texts + queries, int(config.text_tokenizer.max_length))
  rows = np.asarray([row_of[int(i)] for i in example_ids], np.int64)
  return grain.MapDataset.source(Examples(inputs, targets[rows]))


def per_process_batch(global_batch: int) -> int:
  pc = jax.process_count()
  if global_batch % pc:
    raise UserError(f"batch size {global_batch} does not divide over {pc} processes")
  return global_batch // pc


def device_batches(data_iter, mesh):
  for host_batch in data_iter:
    yield partitioning.shard_host_batch(host_batch, mesh)


def loader(config: ConfigDict, workdir: str, gen, global_batch: int, *, seed_offset: int = 0):
  """The grain iterator over `training_source`: shuffled (seed `loader.shuffle_seed` +
  `seed_offset`), repeated, `global_batch` examples per step over all processes."""
  return pipeline.from_config(
    training_source(config, workdir, gen),
    per_process_batch(global_batch),
    config.loader,
    shuffle=True,
    num_epochs=None,
    drop_remainder=True,
    global_order=True,
    seed=int(config.loader.shuffle_seed) + seed_offset,
  )


def peek(iterator: Iterator[Any]) -> tuple[Any, Iterator[Any]]:
  """`(first item, an iterator over all items, the first included)`: the first batch is
  needed before the loop starts (to compile the step for its shardings)."""
  first = next(iterator)

  def chained():
    yield first
    yield from iterator

  return first, chained()
