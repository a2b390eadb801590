"""The generator's train and rank steps (training.generative, training.ltr, training.state):
sharded == single-device, twin negatives, optimizer state sharded like the parameters."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import CompileCounter

from avg_jax import loop, partitioning
from avg_jax.decoding.config import DecodeConfig
from avg_jax.decoding.trie import VokenTrie
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.training import generative, ltr, optim
from avg_jax.training import state as state_lib
from avg_jax.vokens import VokenVocabulary


def _tiny_vocab_and_config(dropout_rate: float):
  vocab = VokenVocabulary(text_vocab_size=20, codebook_size=4, num_levels=2, disambiguation_size=2)
  cfg = T5Config(
    vocab_size=vocab.total_vocab_size,
    num_voken_tokens=vocab.num_voken_tokens,
    d_model=16,
    d_kv=4,
    d_ff=32,
    num_heads=2,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=dropout_rate,
  )
  return vocab, cfg


def _tiny_model():
  vocab, cfg = _tiny_vocab_and_config(dropout_rate=0.1)
  rng = np.random.default_rng(0)
  codes = np.stack([rng.integers(0, 4, 8), rng.integers(0, 4, 8), np.arange(8) % 2], axis=1)
  batch = {
    "inputs": rng.integers(3, 20, (8, 6)).astype(np.int32),
    "targets": vocab.target_tokens(codes),
  }
  return cfg, vocab, codes, batch


def _one_step(mesh, loss_fn, batch, cfg, *extra):
  """One donated, explicitly sharded step from the same initial parameters."""
  tx = optim.adamw(1e-2, grad_clip_norm=1.0)
  variables, _ = partitioning.sharded_init(
    t5_lib.init_variables, mesh, jax.random.key(0), static=(cfg,)
  )
  state, state_shardings = state_lib.create_state(variables["params"], tx, mesh)
  device_batch = partitioning.shard_host_batch(batch, mesh)
  step = loop.make_train_step(lambda p, b, r: loss_fn(p, b, r, *extra), tx)
  jitted = generative.compile_step(step, mesh, state_shardings, device_batch)
  with partitioning.activation_context(mesh):
    new_state, metrics = jitted(state, device_batch, jax.random.key(1))
  return jax.device_get(new_state.params), jax.device_get(metrics)


# Data and model parallel at once: the batch split over "data", the weights over "model". The
# configs' default, data only ({"data": 8} here), is the same partitioned program with a model
# axis of size 1, so it is not compared on its own.
MESH = {"data": 4, "model": 2}


def _compare(loss_fn, batch, cfg, *extra):
  single_mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  single, m1 = _one_step(single_mesh, loss_fn, batch, cfg, *extra)
  sharded, m8 = _one_step(partitioning.make_mesh(MESH), loss_fn, batch, cfg, *extra)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded, single)
  return m1


@pytest.mark.slow
def test_sharded_generative_step_equals_single_device():
  cfg, _, _, batch = _tiny_model()
  _compare(generative.make_loss_fn(cfg, temperature=0.5), batch, cfg)


def test_sharded_rank_step_equals_single_device():
  cfg, vocab, codes, batch = _tiny_model()
  trie = VokenTrie.build(codes, np.arange(8), position_sizes=vocab.position_sizes()).to_device()
  loss_fn = ltr.make_rank_loss_fn(
    cfg,
    vocab,
    decode=DecodeConfig(beam_size=3, top_k=3),
    rank_weight=0.5,
    double_softmax=False,
    temperature=1.0,
  )
  metrics = _compare(loss_fn, batch, cfg, trie)
  # Every query sees its own positive plus 2-3 negatives from the 8 indexed ids.
  assert 2.0 <= metrics["negatives"] <= 3.0
  assert metrics["rank_loss"] > 0 and np.isfinite(metrics["gen_loss"])


def test_rank_loss_skips_twin_negatives():
  # Identifiers (a, b, disambiguation): image 0 = (1, 2, 0) has a twin (1, 2, 1) that differs
  # only in the disambiguation position, and two other images. With beam 3 over 4 images the
  # search returns 3 candidates for every query: the positive is among them or not.
  vocab, cfg = _tiny_vocab_and_config(dropout_rate=0.0)
  codes = np.array([[1, 2, 0], [1, 2, 1], [3, 0, 0], [0, 3, 0]])
  trie = VokenTrie.build(codes, np.arange(4), position_sizes=vocab.position_sizes()).to_device()
  params = t5_lib.init_params(cfg, jax.random.key(0))
  batch = {"inputs": np.full((1, 4), 5, np.int32), "targets": vocab.target_tokens(codes[:1])}
  counts = {}
  for skip in (False, True):
    loss_fn = ltr.make_rank_loss_fn(
      cfg,
      vocab,
      decode=DecodeConfig(beam_size=4, top_k=4),
      rank_weight=1.0,
      double_softmax=False,
      temperature=1.0,
      skip_twin_negatives=skip,
    )
    # Jitted as the step runs it (op by op, each primitive would compile on its own).
    _, metrics = jax.jit(loss_fn)(params, batch, jax.random.key(1), trie)
    counts[skip] = float(metrics["negatives"])
  # Beam 4 finds all 4 images: 3 negatives, one of them the twin.
  assert counts == {False: 3.0, True: 2.0}


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_optimizer_state_is_sharded_like_the_parameters(accumulation_steps):
  # Adam's moments (and accumulated gradients) do not depend on the parameters' values; unless
  # create_state pins their shardings they come out replicated and fsdp saves nothing.
  cfg, _, _, _ = _tiny_model()
  mesh = partitioning.make_mesh({"data": 2, "fsdp": 2, "model": 2})
  variables, _ = partitioning.sharded_init(
    t5_lib.init_variables, mesh, jax.random.key(0), static=(cfg,)
  )
  param_specs = [x.sharding.spec for x in jax.tree.leaves(variables["params"])]
  tx = optim.adamw(1e-3, grad_clip_norm=1.0, accumulation_steps=accumulation_steps)
  state, shardings = state_lib.create_state(variables["params"], tx, mesh)
  assert any("fsdp" in str(spec) for spec in param_specs)
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  # mu and nu, plus the accumulated gradients under MultiSteps.
  copies = 3 if accumulation_steps > 1 else 2
  assert len(moments) == copies * len(param_specs)
  for i, leaf in enumerate(moments):
    assert leaf.sharding.spec == param_specs[i % len(param_specs)]
  assert jax.tree.map(lambda x: x.sharding, state) == shardings
  assert state.step.sharding.spec == jax.sharding.PartitionSpec()


def test_stage_step_matches_the_loop_step_and_is_compiled_once_per_settings():
  # The stage's step (settings static, optimizer built inside) is the loop's step over the
  # same loss and optimizer; built again with equal settings it reuses the compiled program
  # (evaluate trains the other protocol's generator in the same process).
  cfg, _, _, batch = _tiny_model()
  # One device: reuse does not depend on the mesh (the sharded step has its own tests above).
  mesh = partitioning.make_mesh({"data": 1}, devices=jax.devices()[:1])
  settings = generative.TrainStep(
    cfg, 1.0, optim.AdamWSchedule(1e-2, steps=10, warmup_steps=2, grad_clip_norm=1.0)
  )
  tx, schedule = settings.optimizer.build()
  device_batch = partitioning.shard_host_batch(batch, mesh)

  def fresh_state():
    variables, _ = partitioning.sharded_init(
      t5_lib.init_variables, mesh, jax.random.key(0), static=(cfg,)
    )
    return state_lib.create_state(variables["params"], tx, mesh)

  # Each step donates its state: three fresh ones, made outside the activation context (inside
  # it, jit keys the init on the context's mesh as well and would compile it again).
  (state, shardings), (state2, _), (state3, _) = (fresh_state() for _ in range(3))
  initial = jax.device_get(state.params)
  reference = loop.make_train_step(generative.make_loss_fn(cfg, 1.0), tx, schedule)
  with partitioning.activation_context(mesh):
    reference_step = generative.compile_step(reference, mesh, shardings, device_batch)
    stage_step = generative.compile_train_step(mesh, shardings, device_batch)
    want, got = state, state2
    # Two steps: the warm-up's learning rate is 0 at step 0, so after one step both would
    # still hold the initial parameters whatever the steps computed.
    for step in range(2):
      want, want_metrics = reference_step(want, device_batch, jax.random.key(step + 1))
      got, metrics = stage_step(settings, got, device_batch, jax.random.key(step + 1))
    got_params, want_params = jax.device_get(got.params), jax.device_get(want.params)
    jax.tree.map(np.testing.assert_array_equal, got_params, want_params)
    assert float(metrics["learning_rate"]) == float(want_metrics["learning_rate"]) > 0
    moved = [
      not np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(initial))
    ]
    assert any(moved)
    with CompileCounter() as compiles:
      generative.compile_train_step(mesh, shardings, device_batch)(
        generative.TrainStep(cfg, 1.0, settings.optimizer), state3, device_batch, jax.random.key(1)
      )
  assert compiles.count == 0


def test_rank_step_settings_keep_only_what_the_program_depends_on(repo_root):
  from avg_jax import config as config_lib

  config = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"))
  vocab, cfg = _tiny_vocab_and_config(dropout_rate=0.0)
  options = ltr.RankOptions.from_config(config)
  base = ltr.RankStep.of(options, cfg, vocab)
  # Cadences and the batch size: the same program, so the same jit cache key.
  cadence = dataclasses.replace(
    options,
    eval_every=10**9,
    log_every=3,
    checkpoint_every=7,
    batch_size=64,
    eval_max_queries=0,
    keep_checkpoints=1,
  )
  assert ltr.RankStep.of(cadence, cfg, vocab) == base
  assert hash(ltr.RankStep.of(cadence, cfg, vocab)) == hash(base)
  # Anything the loss or the optimizer reads: another program.
  for change in (
    dict(rank_weight=0.0),
    dict(steps=options.steps + 1),
    dict(learning_rate=options.learning_rate * 2),
  ):
    assert ltr.RankStep.of(dataclasses.replace(options, **change), cfg, vocab) != base
