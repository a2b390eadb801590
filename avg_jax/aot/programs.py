"""The jitted step programs of each stage, with abstract (shape + sharding only) inputs.

Every builder returns a `Program`: the same `jax.jit(...)` call (functions, in/out shardings,
donation) the stage makes, and `jax.ShapeDtypeStruct`s with `NamedSharding`s on the mesh for
every argument (parameters, optimizer state, batch, trie), so the program can be lowered and
compiled for devices that are not attached (`avg_jax.aot.topology`). No array is ever placed
on the mesh's devices.

Programs that run the constrained search contain its decode loop (`jax.lax.fori_loop` over
the P identifier steps after the first), whose body XLA's cost analysis counts once. Such a
program carries `loop_body`, one decoder step (`search.grouped_step`) on the same shapes,
and `loop_extra` = P - 1, so the report can add the FLOPs of the uncounted iterations.

Every program is built by the same public functions the stages call (`RQVAETrainer.train_step`,
`generative.compile_train_step`, `ltr.compile_rank_step`, `search.build_search` +
`search_shardings`): what compiles here is what runs.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from avg_jax import partitioning
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.trie import VokenTrie
from avg_jax.errors import UserError
from avg_jax.evaluation.avg_eval import eval_decode
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.tokenizer import losses as tok_losses
from avg_jax.tokenizer import train as tok_train
from avg_jax.tokenizer.model import RQVAEConfig
from avg_jax.training import generative, ltr
from avg_jax.training import state as state_lib
from avg_jax.vokens import VokenVocabulary

STEPS = ("tokenizer", "train", "rank", "search")


@dataclasses.dataclass
class Program:
  """One step to compile: `jitted.lower(*args)`; `batch` examples (or queries) per step."""

  name: str
  jitted: Any
  args: tuple
  batch: int
  description: str
  loop_body: Optional["Program"] = None
  loop_extra: int = 0


def voken_vocabulary(config: ConfigDict) -> VokenVocabulary:
  """The voken vocabulary a trained tokenizer of `config` would give (D from `aot`)."""
  tok = config.tokenizer
  disambiguation = int(config.aot.disambiguation_size) if tok.disambiguation else 0
  return VokenVocabulary(
    text_vocab_size=int(config.t5.vocab_size),
    codebook_size=int(tok.codebook_size),
    num_levels=int(tok.num_levels),
    shared_codebook=bool(tok.shared_codebook),
    disambiguation_size=disambiguation,
  )


def _rng(mesh: Mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=partitioning.replicated(mesh))


def _batch_of(mesh: Mesh, batch: int, length: int) -> jax.ShapeDtypeStruct:
  """`int32[batch, length]` tokens sharded as `partitioning.shard_host_batch` places them."""
  sharding = partitioning.logical_sharding(mesh, "batch", None)
  return jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)


def _check_batch(mesh: Mesh, batch: int, key: str) -> None:
  shards = tok_train.data_parallel_size(mesh)
  if batch % shards:
    raise UserError(
      f"config key {key}={batch} does not divide over the {shards} data-parallel "
      f"shards of mesh {dict(mesh.shape)}"
    )


def tokenizer_program(config: ConfigDict, mesh: Mesh) -> Program:
  """`RQVAETrainer`'s own jitted train step on CLIP-sized (image, caption) embeddings."""
  tok = config.tokenizer
  in_dim = int(config.encoder.projection_dim)
  cfg = RQVAEConfig.from_config(tok, in_dim=in_dim)
  weights = tok_losses.LossWeights.from_config(tok, tok.scheme)
  trainer = tok_train.RQVAETrainer(
    cfg, weights, mesh, tok_train.TrainOptions.from_config(tok, config.seed), int(tok.batch_size)
  )
  pairs = jax.ShapeDtypeStruct(
    (trainer.batch_size, in_dim), jnp.float32, sharding=trainer.batch_sharding
  )
  return Program(
    "tokenizer",
    trainer.jitted_train_step,
    (trainer.settings, trainer.abstract_state, pairs, pairs),
    trainer.batch_size,
    f"RQ-VAE step: {in_dim}->{cfg.hidden_dims}->{cfg.e_dim}, "
    f"L={cfg.num_levels} K={cfg.codebook_size}",
  )


def _t5(config: ConfigDict) -> tuple[T5Config, VokenVocabulary]:
  vocab = voken_vocabulary(config)
  return T5Config.from_config(config.t5, vocab), vocab


def train_program(config: ConfigDict, mesh: Mesh) -> Program:
  """The generative stage's step (`generative.compile_train_step`), optimizer as the train
  stage's."""
  c = config.train
  cfg, vocab = _t5(config)
  batch = int(c.batch_size)
  _check_batch(mesh, batch, "train.batch_size")
  tx, _ = generative.make_optimizer(config)
  params, _ = t5_lib.abstract_params(cfg, mesh)
  state, state_shardings = state_lib.abstract_state(params, tx, mesh)
  example = {
    "inputs": _batch_of(mesh, batch, int(config.text_tokenizer.max_length)),
    "targets": _batch_of(mesh, batch, vocab.id_length + 1),
  }
  jitted = generative.compile_train_step(mesh, state_shardings, example)
  return Program(
    "train",
    jitted,
    (generative.step_settings(config, cfg), state, example, _rng(mesh)),
    batch,
    f"T5 teacher-forced step: {_describe(cfg)}, S={example['inputs'].shape[1]}, "
    f"P+1={vocab.id_length + 1}",
  )


def index_codes(config: ConfigDict, vocab: VokenVocabulary) -> np.ndarray:
  """Random identifiers `int32[N, P]` for the trie of the training images (N: aot.index_size,
  else data.num_train). Array sizes per level are bounded by N whatever the codes are."""
  n = int(config.aot.index_size) or int(config.data.num_train)
  if n < 1:
    raise UserError(f"config key aot.index_size must be positive, got {n}")
  rng = np.random.default_rng(int(config.seed))
  codes = rng.integers(0, vocab.codebook_size, size=(n, vocab.num_levels))
  if vocab.disambiguation_size:
    codes = np.concatenate([codes, np.zeros((n, 1), codes.dtype)], axis=1)
  return codes.astype(np.int32)


def abstract_trie(config: ConfigDict, vocab: VokenVocabulary, mesh: Mesh) -> Any:
  """A replicated abstract `DeviceTrie` with the array sizes of an index of that many images."""
  host = VokenTrie.build(index_codes(config, vocab), position_sizes=vocab.position_sizes())
  device = host.to_device(dense_levels=int(config.decode.dense_levels))
  replicated = partitioning.replicated(mesh)
  return partitioning.abstract(device, jax.tree.map(lambda _: replicated, device))


def decode_body_program(
  cfg: T5Config,
  vocab: VokenVocabulary,
  params: Any,
  param_shardings,
  mesh: Mesh,
  batch: int,
  source_length: int,
  beam: int,
  voken_logits_only: bool,
) -> Program:
  """One decoder step of the search loop: `search.grouped_step` on `batch * beam` rows."""
  inputs = _batch_of(mesh, batch, source_length)
  p = vocab.id_length
  with partitioning.activation_context(mesh):
    cache = jax.eval_shape(
      lambda prm, x: t5_lib.init_decode_state(prm, cfg, t5_lib.encode(prm, cfg, x), x, p + 1),
      params,
      inputs,
    )
  carried, fixed = search_lib.split_cache(cache)
  rows = partitioning.logical_sharding(mesh, "batch")
  lead = lambda x: jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec(rows.spec[0], *([None] * (len(x.shape) - 1)))
  )
  fixed = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=lead(v)) for k, v in fixed.items()}
  state = {
    k: jax.ShapeDtypeStruct((v.shape[0] * beam,) + v.shape[1:], v.dtype, sharding=lead(v))
    for k, v in carried.items()
  }
  tokens = jax.ShapeDtypeStruct((batch * beam,), jnp.int32, sharding=rows)

  def body(prm, tok, st, fx):
    return search_lib.grouped_step(prm, cfg, tok, st, fx, batch, voken_logits_only)

  shardings_of = lambda tree: jax.tree.map(lambda s: s.sharding, tree)
  jitted = jax.jit(
    body, in_shardings=(param_shardings, rows, shardings_of(state), shardings_of(fixed))
  )
  return Program(
    "decode_step",
    jitted,
    (params, tokens, state, fixed),
    batch,
    f"one decoder step on {batch}x{beam} rows",
  )


def rank_program(config: ConfigDict, mesh: Mesh) -> Program:
  """The LTR step as the rank stage jits it: search + scoring + listwise loss."""
  options = ltr.RankOptions.from_config(config)
  cfg, vocab = _t5(config)
  batch, beam = options.batch_size, options.decode.beam
  _check_batch(mesh, batch, "rank.batch_size")
  source_length = int(config.text_tokenizer.max_length)
  tx, _ = ltr.make_optimizer(options)
  params, param_shardings = t5_lib.abstract_params(cfg, mesh)
  state, state_shardings = state_lib.abstract_state(params, tx, mesh)
  trie = abstract_trie(config, vocab, mesh)
  example = {
    "inputs": _batch_of(mesh, batch, source_length),
    "targets": _batch_of(mesh, batch, vocab.id_length + 1),
  }
  jitted = ltr.compile_rank_step(mesh, state_shardings, example, trie)
  body = decode_body_program(
    cfg,
    vocab,
    params,
    param_shardings,
    mesh,
    batch,
    source_length,
    beam,
    voken_logits_only=options.decode.voken_logits_only,
  )
  settings = ltr.RankStep.of(options, cfg, vocab)
  return Program(
    "rank",
    jitted,
    (settings, state, example, _rng(mesh), trie),
    batch,
    f"LTR step: search (beam {beam}) + {1 + beam} scored targets per query, "
    f"index {trie.leaf_item.shape[0]} leaves",
    loop_body=body,
    loop_extra=vocab.id_length - 1,
  )


def search_program(config: ConfigDict, mesh: Mesh) -> Program:
  """The constrained beam search evaluation runs (`search.build_search` with its decode
  settings, `search.search_shardings`), params as trained."""
  d = eval_decode(config)
  cfg, vocab = _t5(config)
  batch, beam = d.batch_size, d.beam
  _check_batch(mesh, batch, "decode.batch_size")
  source_length = int(config.text_tokenizer.max_length)
  params, param_shardings = t5_lib.abstract_params(cfg, mesh)
  trie = abstract_trie(config, vocab, mesh)
  ins, outs = search_lib.search_shardings(mesh, param_shardings)
  jitted = jax.jit(search_lib.build_search(cfg, vocab, d), in_shardings=ins, out_shardings=outs)
  body = decode_body_program(
    cfg,
    vocab,
    params,
    param_shardings,
    mesh,
    batch,
    source_length,
    beam,
    voken_logits_only=d.voken_logits_only,
  )
  return Program(
    "search",
    jitted,
    (params, trie, _batch_of(mesh, batch, source_length)),
    batch,
    f"constrained beam search: beam {beam}, top {d.top_k}, index {trie.leaf_item.shape[0]} leaves",
    loop_body=body,
    loop_extra=vocab.id_length - 1,
  )


BUILDERS: dict[str, Callable[[ConfigDict, Mesh], Program]] = {
  "tokenizer": tokenizer_program,
  "train": train_program,
  "rank": rank_program,
  "search": search_program,
}


def _describe(cfg: T5Config) -> str:
  return (
    f"d_model {cfg.d_model}, {cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers, "
    f"vocab {cfg.vocab_size}, {cfg.dtype}/{cfg.param_dtype}"
    f"{', remat' if cfg.remat else ''}"
  )
