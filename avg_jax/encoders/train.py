"""Training the dual encoder from scratch on the prepared training split (contrastive loss).

Every (image, caption) pair of the split is one training example; an epoch visits each caption
once. Batches come from grain (shuffled, repeated, checkpointable); the train state and the
iterator state are checkpointed together so a resumed run continues with the same batches.
"""

import logging
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from avg_jax import loop, partitioning
from avg_jax.artifacts import checkpoints, paths
from avg_jax.data import dataset, pipeline
from avg_jax.encoders import clip, contrastive, preprocess
from avg_jax.errors import UserError
from avg_jax.metrics import MetricsWriter

log = logging.getLogger(__name__)


class CaptionPair:
  """Index i -> caption i % C of image i // C with that image resized/cropped (picklable)."""

  def __init__(self, images: Any, captions_per_image: int, pre: preprocess.PreprocessConfig):
    self.images, self.captions_per_image, self.pre = images, captions_per_image, pre

  def __call__(self, index: int) -> dict:
    image_index, caption_index = divmod(int(index), self.captions_per_image)
    element = self.images[image_index]
    return {
      "image": preprocess.resize_and_crop(element["image"], self.pre),
      "image_id": np.int64(element["image_id"]),
      "caption": element["captions"][caption_index],
    }


class Tokenize:
  """Batch transform: `caption str[B]` -> `tokens int32[B, max_length]` (picklable)."""

  def __init__(self, tokenizer: Any, max_length: int, key: str = "caption"):
    self.tokenizer, self.max_length, self.key = tokenizer, max_length, key

  def __call__(self, batch: dict) -> dict:
    batch = dict(batch)
    texts = [str(t) for t in batch.pop(self.key)]
    batch["tokens"] = self.tokenizer.encode_batch(texts, self.max_length)
    return batch


def pair_source(workdir: str, split: str, pre: preprocess.PreprocessConfig) -> grain.MapDataset:
  """`MapDataset` of every (image, caption) pair of `split`, caption_source order."""
  images = dataset.image_source(workdir, split)
  c = int(dataset.load_info(workdir)["captions_per_image"])
  return grain.MapDataset.range(len(images) * c).map(CaptionPair(images, c, pre))


def train_encoder(
  config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, tokenizer: Any
) -> tuple[clip.ClipConfig, Any]:
  """Trains (or resumes, or finds finished) the dual encoder; -> (config, sharded params)."""
  tcfg = config.encoder_train
  cfg = clip.ClipConfig.from_config(
    config.encoder,
    vocab_size=tokenizer.vocab_size,
    eos_token_id=1,
    pad_token_id=0,
    init_temperature=float(tcfg.init_temperature),
  )
  pre = preprocess.PreprocessConfig.for_image_size(cfg.image_size)
  batch_size, processes = int(tcfg.batch_size), jax.process_count()
  data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % processes or batch_size % data_shards:
    raise UserError(
      f"config encoder_train.batch_size={batch_size} must be divisible by the "
      f"{processes} processes and the {data_shards} data-parallel devices"
    )
  steps = int(tcfg.steps)
  if steps < 1:
    raise UserError(f"config encoder_train.steps={steps} must be >= 1 to train an encoder")

  tx = contrastive.make_optimizer(tcfg)
  schedule = contrastive.learning_rate_schedule(tcfg)
  rng = jax.random.key(int(config.seed))
  state, shardings = contrastive.create_train_state(cfg, tx, mesh, jax.random.fold_in(rng, 0))
  step_fn = contrastive.make_train_step(cfg, tx, schedule, mesh, shardings, pre.mean, pre.std)

  data_iter = pipeline.from_config(
    pair_source(workdir, "train", pre),
    batch_size // processes,
    config.loader,
    shuffle=True,
    num_epochs=None,
    drop_remainder=True,
    batch_map_fn=Tokenize(tokenizer, cfg.max_text_length),
  )
  checkpointer = checkpoints.Checkpointer(paths.checkpoints_dir(paths.embed_dir(workdir)), keep=2)
  restored = checkpointer.restore_latest_good(
    partitioning.abstract(state, shardings), data_iter=data_iter
  )
  if restored is not None:
    state = restored[1]

  def batches():
    for batch in data_iter:
      host = {"image": batch["image"], "tokens": batch["tokens"], "image_id": batch["image_id"]}
      yield partitioning.shard_host_batch(host, mesh)

  writer = MetricsWriter(workdir, "embed", process_index=jax.process_index())
  try:
    state = loop.fit(
      step_fn=step_fn,
      state=state,
      rng=jax.random.fold_in(rng, 1),
      batches=batches(),
      num_steps=steps,
      checkpointer=checkpointer,
      checkpoint_every=int(tcfg.checkpoint_every),
      writer=writer,
      data_iter=data_iter,
      metadata={"encoder": cfg.to_dict()},
      log_every=int(tcfg.log_every),
      examples_per_step=batch_size,
      desc="embed: train dual encoder",
    )
  finally:
    checkpointer.close()
  return cfg, state.params
