"""`avg-jax train`: the generative stage (caption or pseudo query -> voken ids + EOS).

Examples are (query tokens, target tokens) pairs: every caption of every training image, and
under the transductive protocol (`config.protocol`) every pseudo query of the indexed (val /
test) images, `train.pseudo_query_repeats` times, with the identifier of its image in its own
split's index. Cross-entropy with `train.temperature`, AdamW with linear warmup + decay,
clipping, optional accumulation; checkpoints with the grain iterator state in
`paths.train_dir(workdir, scheme, protocol)`; validation Recall@K through the constrained
search.
"""

import logging
import os
from typing import Any

import grain
import jax
import numpy as np
import optax
from ml_collections import ConfigDict

from avg_jax import config as config_lib
from avg_jax import partitioning, paths
from avg_jax.data import dataset, pipeline
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.errors import UserError
from avg_jax.evaluation import avg_eval
from avg_jax.metrics import MetricsWriter
from avg_jax.models import t5 as t5_lib
from avg_jax.training import generator as generator_lib
from avg_jax.training import loop, losses, optim
from avg_jax.training.checkpointing import Checkpointer, StopSignal, load_params, save_params

CHECKPOINTS = "checkpoints"
FINAL_PARAMS = "params"
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


def pseudo_examples(workdir: str, gen, repeats: int) -> tuple[np.ndarray, list[str]]:
  """The transductive protocol's extra examples: `(image ids [M], M pseudo queries)` of the
  indexed images, each `repeats` times."""
  indexed = [s for s in gen.training_splits() if s != "train"]
  if not indexed:
    return np.zeros((0,), np.int64), []
  image_ids = np.concatenate([gen.table[s][0] for s in indexed])
  ids, queries = pseudo_lib.of_images(workdir, image_ids)
  if not queries:
    log.warning("protocol 'transductive' but the prepared data has no pseudo queries for the "
                "%s images: training sees the training captions only", "/".join(indexed))
  return np.tile(ids, repeats), queries * repeats


def training_source(config: ConfigDict, workdir: str, gen) -> grain.MapDataset:
  """Every (caption or pseudo query, target) example the protocol trains on: the training
  captions in caption order, then the pseudo queries. All texts are tokenized here in one
  call: a per-example tokenizer call costs more CPU than a train step of the smoke model."""
  ids, targets = zip(*(gen.targets(s) for s in gen.training_splits()))
  row_of = {int(i): r for r, i in enumerate(np.concatenate(ids))}
  targets = np.concatenate(targets)
  caption_ids, texts = dataset.read_texts(workdir, "train")
  pseudo_ids, queries = pseudo_examples(workdir, gen, int(config.train.pseudo_query_repeats))
  example_ids = np.concatenate([caption_ids, pseudo_ids])
  inputs = gen.tokenizer.encode_batch(texts + queries, int(config.text_tokenizer.max_length))
  rows = np.asarray([row_of[int(i)] for i in example_ids], np.int64)
  return grain.MapDataset.source(Examples(inputs, targets[rows]))


def make_loss_fn(cfg, temperature: float):
  """`(params, batch, rng) -> (loss, metrics)` for teacher-forced generation."""

  def loss_fn(params, batch, rng):
    out = t5_lib.logits(params, cfg, batch["inputs"], batch["targets"], deterministic=False,
                        rngs={"dropout": rng})
    loss, accuracy, num_tokens = losses.token_cross_entropy(out, batch["targets"],
                                                            temperature=temperature)
    return loss, {"token_accuracy": accuracy, "num_tokens": num_tokens}

  return loss_fn


def compile_step(step_fn, mesh, state_shardings, batch_example):
  """`jax.jit` with explicit shardings, donating the state."""
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch_example)
  replicated = partitioning.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def state_shardings(params, tx, mesh) -> loop.TrainState:
  """Shardings of `loop.create_state(params, tx)` for `params` (arrays or `ShapeDtypeStruct`s
  with shardings): each parameter-shaped optimizer leaf (Adam's moments, accumulated
  gradients) like its parameter, the rest (counts, step) replicated.

  Explicit because Adam's moments are zeros that do not depend on the parameters: left to XLA,
  they come out replicated, and under fsdp/model meshes 2/3 of the state would not shard.
  """
  replicated = partitioning.replicated(mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  shapes = jax.eval_shape(lambda p: loop.create_state(p, tx), params)
  opt_state = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, param_shardings,
                                    transform_non_params=lambda _: replicated)
  return loop.TrainState(step=replicated, params=param_shardings, opt_state=opt_state)


def create_state(params, tx, mesh) -> tuple[loop.TrainState, Any]:
  """A sharded `TrainState` and its shardings (see `state_shardings`); donates `params`."""
  shardings = state_shardings(params, tx, mesh)
  state = jax.jit(lambda p: loop.create_state(p, tx), in_shardings=(shardings.params,),
                  out_shardings=shardings, donate_argnums=(0,))(params)
  return state, shardings


def make_optimizer(config: ConfigDict):
  """`(tx, schedule)` of the generative stage (AdamW, warmup + linear decay, clipping,
  accumulation), as `train.*` configures it."""
  c = config.train
  schedule = optim.warmup_linear_schedule(float(c.learning_rate), int(c.steps),
                                          int(c.warmup_fraction * c.steps),
                                          float(c.end_learning_rate_fraction))
  tx = optim.adamw(schedule, weight_decay=float(c.weight_decay),
                   grad_clip_norm=float(c.grad_clip_norm),
                   accumulation_steps=int(c.grad_accum_steps))
  return tx, schedule


def per_process_batch(global_batch: int) -> int:
  pc = jax.process_count()
  if global_batch % pc:
    raise UserError(f"batch size {global_batch} does not divide over {pc} processes")
  return global_batch // pc


def device_batches(data_iter, mesh):
  for host_batch in data_iter:
    yield partitioning.shard_host_batch(host_batch, mesh)


def metadata(config: ConfigDict, gen, stage: str) -> dict:
  return {"stage": stage, "scheme": gen.scheme, "protocol": gen.protocol,
          "voken_table_hash": gen.table_hash, "config": config_lib.to_json_dict(config)}


def check_table_hash(found_metadata: dict, gen, directory: str) -> None:
  """A checkpoint trained on another voken table must not silently continue."""
  if found_metadata.get("voken_table_hash") not in (None, gen.table_hash):
    raise UserError(f"checkpoint in {directory} was trained on another voken table "
                    f"({found_metadata['voken_table_hash']} != {gen.table_hash}); "
                    f"delete it or use another workdir")


def restore_or(checkpointer: Checkpointer, state, data_iter, gen) -> loop.TrainState:
  """Resumes from the newest good checkpoint in the stage's own directory, if any."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  found = checkpointer.restore_latest_good(abstract, data_iter=data_iter)
  if found is None:
    return state
  step, restored, meta = found
  check_table_hash(meta, gen, checkpointer.directory)
  return restored


def params_dir(workdir: str, scheme: str, protocol: str, stage: str = "train") -> str:
  """Where a finished stage keeps its final parameters."""
  base = paths.train_dir if stage == "train" else paths.rank_dir
  return os.path.join(base(workdir, scheme, protocol), FINAL_PARAMS)


def ensure_final_params(directory: str, params) -> None:
  """(Re)writes a finished stage's parameters when they are missing or unreadable."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          params)
  try:
    load_params(directory, abstract)
  except UserError:
    save_params(directory, params)


def already_finished(checkpoint_dir: str, final_dir: str, steps: int, gen, mesh) -> bool:
  """True when the stage reached `steps` and its final parameters load: nothing to do."""
  if not os.path.isdir(final_dir) or not os.path.isdir(checkpoint_dir):
    return False
  steps_done = sorted(int(p) for p in os.listdir(checkpoint_dir) if p.isdigit())
  if not steps_done or steps_done[-1] != steps:
    return False
  try:
    load_params(final_dir, abstract_params(gen, mesh)[0])
  except UserError:
    return False
  return True


def abstract_params(gen, mesh):
  """`ShapeDtypeStruct`s with shardings for the generator's parameters."""
  shardings = t5_lib.param_shardings(gen.cfg, mesh)["params"]
  shapes = jax.eval_shape(lambda r: t5_lib.init_params(gen.cfg, r), jax.random.key(0))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, shardings), shardings


def final_params(config: ConfigDict, workdir: str, scheme: str, stage: str = "train",
                 protocol: str | None = None):
  """`(gen, mesh, params, shardings)` of a finished train (or rank) stage."""
  gen = generator_lib.load_generator(config, workdir, scheme, protocol)
  mesh = partitioning.make_mesh(config.mesh)
  directory = params_dir(workdir, scheme, gen.protocol, stage)
  if not os.path.isdir(directory):
    raise UserError(f"no finished {stage} stage for scheme {scheme!r}, protocol "
                    f"{gen.protocol!r} ({directory} is missing); run `avg-jax {stage}` first")
  abstract, shardings = abstract_params(gen, mesh)
  return gen, mesh, load_params(directory, abstract), shardings


def run(config: ConfigDict, workdir: str) -> None:
  train_generator(config, workdir, config.tokenizer.scheme)


def train_generator(config: ConfigDict, workdir: str, scheme: str,
                    protocol: str | None = None) -> None:
  """Trains the generator of `scheme` under `protocol` (default `config.protocol`) to
  `train.steps` (resuming when possible)."""
  c = config.train
  gen = generator_lib.load_generator(config, workdir, scheme, protocol)
  name = f"{scheme}, {gen.protocol}"
  mesh = partitioning.make_mesh(config.mesh)
  final_dir = params_dir(workdir, scheme, gen.protocol)
  directory = os.path.join(paths.train_dir(workdir, scheme, gen.protocol), CHECKPOINTS)
  if already_finished(directory, final_dir, int(c.steps), gen, mesh):
    print(f"train [{name}]: finished ({c.steps} steps) in {directory}; kept")
    return
  rng = jax.random.key(int(config.seed))
  init_rng, dropout_rng = jax.random.split(rng)
  params, _ = generator_lib.init_params(config, gen, mesh, init_rng)
  tx, schedule = make_optimizer(config)
  state, state_shardings = create_state(params, tx, mesh)
  del params

  data_iter = pipeline.from_config(
      training_source(config, workdir, gen), per_process_batch(int(c.batch_size)),
      config.loader, shuffle=True, num_epochs=None, drop_remainder=True, global_order=True)
  checkpointer = Checkpointer(directory, keep=int(c.keep_checkpoints),
                              async_save=bool(c.async_checkpointing))
  writer = MetricsWriter(workdir, "train", process_index=jax.process_index())
  try:
    state = restore_or(checkpointer, state, data_iter, gen)
    if int(jax.device_get(state.step)) >= int(c.steps):
      ensure_final_params(final_dir, state.params)
      print(f"train [{name}]: already finished ({c.steps} steps) in {directory}")
      return
    batches = device_batches(data_iter, mesh)
    first = next(batches)
    step_fn = compile_step(loop.make_train_step(make_loss_fn(gen.cfg, float(c.temperature)),
                                                tx, schedule), mesh, state_shardings, first)
    batches = _chain([first], batches)
    param_shardings = state_shardings.params
    search_fn = avg_eval.make_eval_search_fn(gen, mesh, param_shardings, config)

    def eval_fn(s):
      m = avg_eval.evaluate_recall(gen, s.params, param_shardings, mesh, config, workdir, "val",
                                   max_queries=int(c.eval_max_queries), search_fn=search_fn)
      return {"split": "val", "method": scheme, "protocol": gen.protocol,
              **{k: v for k, v in m.items() if not k.startswith("_")}}

    with partitioning.activation_context(mesh), StopSignal() as stop:
      state = loop.fit(step_fn=step_fn, state=state, rng=dropout_rng, batches=batches,
               num_steps=int(c.steps), checkpointer=checkpointer,
               checkpoint_every=int(c.checkpoint_every), writer=writer, data_iter=data_iter,
               metadata=metadata(config, gen, "train"), log_every=int(c.log_every),
               examples_per_step=int(c.batch_size), eval_fn=eval_fn,
               eval_every=int(c.eval_every), stop=stop, desc=f"train [{name}]")
    save_params(final_dir, state.params)
  finally:
    checkpointer.close()


def _chain(head, tail):
  yield from head
  yield from tail
