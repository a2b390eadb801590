"""`avg-jax train`: the generative stage (caption or pseudo query -> voken ids + EOS).

Examples are (caption tokens, target tokens) pairs: every caption of every training image,
plus optional pseudo queries from `train.pseudo_queries` (JSON lines `{"image_id", "query"}`
or `image_id<TAB>query` lines). Cross-entropy with `train.temperature`, AdamW with linear
warmup + decay, clipping, optional accumulation; checkpoints with the grain iterator state in
`paths.train_dir(workdir, scheme)`; validation Recall@K through the constrained search.
"""

import json
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
from avg_jax.errors import UserError
from avg_jax.evaluation import avg_eval
from avg_jax.metrics import MetricsWriter
from avg_jax.models import t5 as t5_lib
from avg_jax.training import generator as generator_lib
from avg_jax.training import loop, losses, optim
from avg_jax.training.checkpointing import Checkpointer, StopSignal, load_params, save_params

CHECKPOINTS = "checkpoints"
FINAL_PARAMS = "params"


class EncodeExample:
  """caption element -> {"inputs": int32[S], "targets": int32[P + 1]} (picklable for workers)."""

  def __init__(self, tokenizer, max_length: int, image_ids: np.ndarray, targets: np.ndarray):
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.row_of = {int(i): r for r, i in enumerate(image_ids)}
    self.targets = targets

  def __call__(self, element: dict) -> dict:
    row = self.row_of[int(element["image_id"])]
    inputs = self.tokenizer.encode_batch([str(element["caption"])], self.max_length)[0]
    return {"inputs": inputs, "targets": self.targets[row]}


def read_pseudo_queries(path: str, known_ids: set) -> list[dict]:
  """Reads extra (image id, query) pairs; errors name the file and line."""
  if not os.path.isfile(path):
    raise UserError(f"pseudo query file not found: {path}")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line.strip():
        continue
      try:
        if line.lstrip().startswith("{"):
          rec = json.loads(line)
          image_id, query = int(rec["image_id"]), str(rec["query"])
        else:
          image_id_text, query = line.split("\t", 1)
          image_id = int(image_id_text)
      except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}:{n}: expected {{\"image_id\": int, \"query\": str}} or "
                        f"'image_id<TAB>query' ({type(e).__name__})") from e
      if image_id not in known_ids:
        raise UserError(f"{path}:{n}: image id {image_id} is not a training image")
      if not query.strip():
        raise UserError(f"{path}:{n}: empty query")
      out.append({"image_id": np.int64(image_id), "caption": query})
  return out


def training_source(config: ConfigDict, workdir: str, gen) -> grain.MapDataset:
  """Every (caption or pseudo query, target) example of the training split."""
  image_ids, targets = gen.targets("train")
  source = dataset.caption_source(workdir, "train")
  if config.train.pseudo_queries:
    extra = read_pseudo_queries(config.train.pseudo_queries, set(int(i) for i in image_ids))
    source = grain.MapDataset.concatenate([source, grain.MapDataset.source(extra)])
  encode = EncodeExample(gen.tokenizer, int(config.text_tokenizer.max_length), image_ids, targets)
  return source.map(encode)


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
  return {"stage": stage, "scheme": config.tokenizer.scheme, "voken_table_hash": gen.table_hash,
          "config": config_lib.to_json_dict(config)}


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


def params_dir(workdir: str, scheme: str, stage: str = "train") -> str:
  """Where a finished stage keeps its final parameters."""
  base = paths.train_dir if stage == "train" else paths.rank_dir
  return os.path.join(base(workdir, scheme), FINAL_PARAMS)


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


def final_params(config: ConfigDict, workdir: str, scheme: str, stage: str = "train"):
  """`(gen, mesh, params, shardings)` of a finished train (or rank) stage."""
  gen = generator_lib.load_generator(config, workdir, scheme)
  mesh = partitioning.make_mesh(config.mesh)
  directory = params_dir(workdir, scheme, stage)
  if not os.path.isdir(directory):
    raise UserError(f"no finished {stage} stage for scheme {scheme!r} ({directory} is "
                    f"missing); run `avg-jax {stage}` first")
  abstract, shardings = abstract_params(gen, mesh)
  return gen, mesh, load_params(directory, abstract), shardings


def run(config: ConfigDict, workdir: str) -> None:
  train_generator(config, workdir, config.tokenizer.scheme)


def train_generator(config: ConfigDict, workdir: str, scheme: str) -> None:
  """Trains the generator of `scheme` to `train.steps` (resuming when possible)."""
  c = config.train
  gen = generator_lib.load_generator(config, workdir, scheme)
  mesh = partitioning.make_mesh(config.mesh)
  directory = os.path.join(paths.train_dir(workdir, scheme), CHECKPOINTS)
  if already_finished(directory, params_dir(workdir, scheme), int(c.steps), gen, mesh):
    print(f"train [{scheme}]: finished ({c.steps} steps) in {directory}; kept")
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
  directory = os.path.join(paths.train_dir(workdir, scheme), CHECKPOINTS)
  checkpointer = Checkpointer(directory, keep=int(c.keep_checkpoints),
                              async_save=bool(c.async_checkpointing))
  writer = MetricsWriter(workdir, "train", process_index=jax.process_index())
  try:
    state = restore_or(checkpointer, state, data_iter, gen)
    if int(jax.device_get(state.step)) >= int(c.steps):
      ensure_final_params(params_dir(workdir, scheme), state.params)
      print(f"train [{scheme}]: already finished ({c.steps} steps) in {directory}")
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
      return {"split": "val", "method": scheme,
              **{k: v for k, v in m.items() if not k.startswith("_")}}

    with partitioning.activation_context(mesh), StopSignal() as stop:
      state = loop.fit(step_fn=step_fn, state=state, rng=dropout_rng, batches=batches,
               num_steps=int(c.steps), checkpointer=checkpointer,
               checkpoint_every=int(c.checkpoint_every), writer=writer, data_iter=data_iter,
               metadata=metadata(config, gen, "train"), log_every=int(c.log_every),
               examples_per_step=int(c.batch_size), eval_fn=eval_fn,
               eval_every=int(c.eval_every), stop=stop, desc=f"train [{scheme}]")
    save_params(params_dir(workdir, scheme), state.params)
  finally:
    checkpointer.close()


def _chain(head, tail):
  yield from head
  yield from tail
