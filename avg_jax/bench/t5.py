"""`avg-jax bench t5`: training tokens/s and cached decode steps/s, ours vs PyTorch T5.

For each size (a small T5 and T5-base shapes, both v1.0: ReLU, tied embeddings, with 1024
voken rows appended to the text vocabulary, float32), on the same shapes and batch:

- train: one optimiser step (forward, backward, AdamW, dropout on); tokens/s counts source +
  target tokens of the batch. Ours is one jitted step with donated state.
- decode: decoding one identifier (L + 1 = 5 steps) for `queries x beam` rows from a
  precomputed encoder output: ours is `init_decode_state` (cross-attention K/V once) plus 5
  jitted `decode_step` calls; the reference is 5 Hugging Face forward calls with
  `past_key_values` (cross K/V computed at the first). steps/s = 5 / time. Ours is also
  timed with `voken_logits_only`.

The reference side needs the optional `reference` extra (torch + transformers); without it
the bench says so and reports ours only. Writes `<workdir>/bench_t5.json`.
"""

import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from avg_jax.artifacts import io
from avg_jax.bench import common
from avg_jax.models import t5

NUM_VOKENS = 1024
ID_STEPS = 5  # 4 vokens + EOS
SOURCE_LENGTH = 32
BEAM = 10
LEARNING_RATE = 1e-4
DROPOUT = 0.1


@dataclasses.dataclass(frozen=True)
class Size:
  name: str
  text_vocab: int
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  num_layers: int
  train_batch: int
  decode_queries: int
  steps: int  # timed repetitions (the median is reported)


SIZES = (
  Size("small", 8000, 256, 32, 1024, 8, 4, train_batch=16, decode_queries=8, steps=5),
  Size("t5-base", 32128, 768, 64, 3072, 12, 12, train_batch=8, decode_queries=4, steps=2),
)
# --quick (tests): the smallest shapes only.
QUICK = (Size("tiny", 500, 64, 16, 128, 4, 2, train_batch=8, decode_queries=2, steps=2),)


def _cfg(size: Size) -> t5.T5Config:
  # Layers under nn.scan: one compiled layer body (T5-base compiles in a fraction of the
  # unrolled time); measured no slower per step on CPU.
  return t5.T5Config(
    vocab_size=size.text_vocab + NUM_VOKENS,
    d_model=size.d_model,
    d_kv=size.d_kv,
    d_ff=size.d_ff,
    num_heads=size.num_heads,
    num_encoder_layers=size.num_layers,
    num_decoder_layers=size.num_layers,
    dropout_rate=DROPOUT,
    num_voken_tokens=NUM_VOKENS,
    scan_layers=True,
  )


def _batch(size: Size, batch: int, seed: int):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, size.text_vocab, size=(batch, SOURCE_LENGTH)).astype(np.int32)
  inputs[:, -1] = 1
  targets = rng.integers(
    size.text_vocab, size.text_vocab + NUM_VOKENS, size=(batch, ID_STEPS)
  ).astype(np.int32)
  targets[:, -1] = 1
  return inputs, targets


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------


def _ours_train(size: Size, cfg: t5.T5Config, params, seed: int) -> dict:
  """Times the training step; `params` are donated (unusable afterwards)."""
  tx = optax.adamw(LEARNING_RATE, weight_decay=0.0)
  state = (params, jax.jit(tx.init)(params))
  inputs, targets = (jnp.asarray(x) for x in _batch(size, size.train_batch, seed))

  def step(state, rng):
    params, opt_state = state

    def loss_fn(p):
      return t5.cross_entropy_loss(
        p, cfg, inputs, targets, deterministic=False, rngs={"dropout": rng}
      )[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  # Single device: default shardings; the state is donated as in training.
  step = jax.jit(step, donate_argnums=0)
  holder = {"state": state, "i": 0}

  def once():
    holder["i"] += 1
    holder["state"], loss = step(holder["state"], jax.random.key(holder["i"]))
    jax.block_until_ready(loss)

  start = time.perf_counter()
  once()  # compile + first step
  first = time.perf_counter() - start
  seconds = _median_time(once, size.steps)
  tokens = size.train_batch * (SOURCE_LENGTH + ID_STEPS)
  return {"step_s": seconds, "tokens_per_s": tokens / seconds, "first_step_s": first}


def _ours_decode(size: Size, cfg: t5.T5Config, params, seed: int, voken_only: bool) -> dict:
  rows = size.decode_queries * BEAM
  inputs, targets = _batch(size, rows, seed)
  encoded = jax.block_until_ready(jax.jit(t5.encode, static_argnums=1)(params, cfg, inputs))
  init = jax.jit(t5.init_decode_state, static_argnums=(1, 4))
  step = jax.jit(lambda p, tok, c: t5.decode_step(p, cfg, tok, c, voken_logits_only=voken_only))
  tokens = [jnp.zeros((rows,), jnp.int32)] + [
    jnp.asarray(targets[:, i]) for i in range(ID_STEPS - 1)
  ]

  def once():
    cache = init(params, cfg, encoded, inputs, ID_STEPS)
    for tok in tokens:
      out, cache = step(params, tok, cache)
    jax.block_until_ready(out)

  once()  # compile
  seconds = _median_time(once, size.steps)
  return {"decode_s": seconds, "steps_per_s": ID_STEPS / seconds}


# ----------------------------------------------------------------------------------------------
# PyTorch reference (optional)
# ----------------------------------------------------------------------------------------------


def _reference_available() -> str:
  """ "" when torch + transformers import, else the reason."""
  # Idle OpenMP threads sleep instead of spinning: on a shared (oversubscribed) CPU, spinning
  # made PyTorch's 2-thread step up to 7x slower than its 1-thread step here. Must be set
  # before torch loads; an explicit setting is kept.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except Exception as e:  # any import failure means no reference side
    return f"{type(e).__name__}: {e}"
  return ""


def _torch_model(size: Size, seed: int):
  import torch
  from transformers import T5Config as HFConfig
  from transformers import T5ForConditionalGeneration

  torch.manual_seed(seed)
  hf = HFConfig(
    vocab_size=size.text_vocab + NUM_VOKENS,
    d_model=size.d_model,
    d_kv=size.d_kv,
    d_ff=size.d_ff,
    num_heads=size.num_heads,
    num_layers=size.num_layers,
    num_decoder_layers=size.num_layers,
    dropout_rate=DROPOUT,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  )
  return T5ForConditionalGeneration(hf)


def _torch_train(size: Size, model, seed: int) -> dict:
  import torch

  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
  inputs, targets = (
    torch.tensor(x, dtype=torch.long) for x in _batch(size, size.train_batch, seed)
  )
  mask = (inputs != 0).long()

  def once():
    loss = model(input_ids=inputs, attention_mask=mask, labels=targets).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  once()
  seconds = _median_time(once, size.steps)
  tokens = size.train_batch * (SOURCE_LENGTH + ID_STEPS)
  return {"step_s": seconds, "tokens_per_s": tokens / seconds}


def _torch_decode(size: Size, model, seed: int) -> dict:
  import torch
  from transformers.modeling_outputs import BaseModelOutput

  model.eval()
  rows = size.decode_queries * BEAM
  inputs, targets = (torch.tensor(x, dtype=torch.long) for x in _batch(size, rows, seed))
  mask = (inputs != 0).long()
  with torch.no_grad():
    encoded = BaseModelOutput(model.encoder(input_ids=inputs, attention_mask=mask)[0])
  tokens = [torch.zeros((rows, 1), dtype=torch.long)] + [
    targets[:, i : i + 1] for i in range(ID_STEPS - 1)
  ]

  def once():
    past = None
    with torch.no_grad():
      for tok in tokens:
        out = model(
          encoder_outputs=encoded,
          attention_mask=mask,
          decoder_input_ids=tok,
          past_key_values=past,
          use_cache=True,
        )
        past = out.past_key_values

  once()
  seconds = _median_time(once, size.steps)
  return {"decode_s": seconds, "steps_per_s": ID_STEPS / seconds}


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _machine(command: str) -> dict:
  info = common.machine_info(command)
  if not _reference_available():
    import torch
    import transformers

    info.update(
      torch=torch.__version__,
      transformers=transformers.__version__,
      torch_threads=torch.get_num_threads(),
    )
  return info


def _ratio(ours: float, ref: float | None) -> float | None:
  return None if ref is None else ours / ref


def run(config, workdir: str, args) -> dict:
  """Runs the benchmark, prints a table and writes `<workdir>/bench_t5.json`."""
  quick = bool(getattr(args, "quick", False))
  sizes = QUICK if quick else SIZES
  seed = int(config.seed)
  missing = _reference_available()
  command = " ".join(["avg-jax"] + sys.argv[1:]) if sys.argv else "avg-jax bench t5"
  if missing:
    print(
      f"reference (PyTorch transformers T5) not run: {missing}; install the `reference` "
      "extra (requirements-reference.txt) to compare"
    )
  results = []
  for size in sizes:
    print(f"[{size.name}] ours", flush=True)
    cfg = _cfg(size)
    params = t5.init_params(cfg, jax.random.key(seed))
    ours_decode = _ours_decode(size, cfg, params, seed, voken_only=False)
    ours_voken = _ours_decode(size, cfg, params, seed, voken_only=True)
    ours_train = _ours_train(size, cfg, params, seed)  # donates params
    del params
    ref_train = ref_decode = None
    if not missing:
      print(f"[{size.name}] pytorch", flush=True)
      model = _torch_model(size, seed)
      ref_decode = _torch_decode(size, model, seed)
      ref_train = _torch_train(size, model, seed)
      del model
    results.append(
      {
        "size": dataclasses.asdict(size),
        "train": {
          "ours": ours_train,
          "reference": ref_train,
          "ratio_tokens_per_s": _ratio(
            ours_train["tokens_per_s"], None if ref_train is None else ref_train["tokens_per_s"]
          ),
        },
        "decode": {
          "ours": ours_decode,
          "ours_voken_logits_only": ours_voken,
          "reference": ref_decode,
          "ratio_steps_per_s": _ratio(
            ours_decode["steps_per_s"], None if ref_decode is None else ref_decode["steps_per_s"]
          ),
        },
      }
    )
  data = {
    "bench": "t5",
    "machine": _machine(command),
    "reference_available": not missing,
    "reference_missing_reason": missing or None,
    "setup": {
      "num_voken_rows": NUM_VOKENS,
      "source_length": SOURCE_LENGTH,
      "id_steps": ID_STEPS,
      "beam": BEAM,
      "dtype": "float32",
      "optimizer": "AdamW",
      "dropout": DROPOUT,
      "scan_layers": True,
      "tokens_per_step": "batch * (source + target)",
      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    },
    "results": results,
  }
  _print_table(results)
  path = os.path.join(workdir, "bench_t5.json")
  io.write_json(path, data, indent=2)
  print(f"wrote {path}")
  return data


def _fmt(x: float | None, spec: str = ".1f") -> str:
  return "-" if x is None else format(x, spec)


def _print_table(results: list) -> None:
  header = f"{'size':<8} {'metric':<28} {'ours':>10} {'pytorch':>10} {'ratio':>7}"
  print(header)
  print("-" * len(header))
  for r in results:
    name = r["size"]["name"]
    tr, de = r["train"], r["decode"]
    print(
      f"{name:<8} {'train tokens/s':<28} {_fmt(tr['ours']['tokens_per_s']):>10} "
      f"{_fmt(tr['reference'] and tr['reference']['tokens_per_s']):>10} "
      f"{_fmt(tr['ratio_tokens_per_s'], '.2f'):>7}"
    )
    print(
      f"{name:<8} {'decode steps/s (full vocab)':<28} "
      f"{_fmt(de['ours']['steps_per_s']):>10} "
      f"{_fmt(de['reference'] and de['reference']['steps_per_s']):>10} "
      f"{_fmt(de['ratio_steps_per_s'], '.2f'):>7}"
    )
    print(
      f"{name:<8} {'decode steps/s (voken only)':<28} "
      f"{_fmt(de['ours_voken_logits_only']['steps_per_s']):>10} {'':>10} {'':>7}"
    )
