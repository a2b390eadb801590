"""`avg-jax bench train`: generative train-step throughput on CPU, 1 vs 8 (fake) devices, or
on the attached accelerator with model FLOPs utilisation (`--accelerator`).

CPU: each device count runs in its own subprocess (the fake-device count is fixed when XLA
starts), float32. Accelerator: one in-process run on all local devices of the default backend
(GPU/TPU), bfloat16 compute, the config's own training batch, MFU = XLA's FLOPs per step /
step time / (devices x `--peak-tflops`). Mesh: `fsdp` over all devices (parameters sharded,
batch split). Models: the smoke config's T5 and T5-base shapes (configs/flickr30k.py), with the
real step (`training.generative.make_loss_fn` + `loop.make_train_step`, explicit
shardings, donated state). Batches are random token ids of the configured lengths.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

from avg_jax.artifacts import io
from avg_jax.bench import common
from avg_jax.cloud import local_multiprocess
from avg_jax.errors import UserError

DEVICE_COUNTS = (1, 8)
# name -> (config spec, global batch, timed steps)
MODELS = {"smoke": ("configs/smoke.py", 128, 10), "t5-base": ("configs/flickr30k.py:t5-base", 8, 3)}
QUICK_MODELS = {"tiny": ("configs/smoke.py:tiny", 32, 5)}
# On an accelerator: batch 0 = the config's train.batch_size.
ACCELERATOR_MODELS = {
  "t5-base": ("configs/flickr30k.py:t5-base", 0, 20),
  "t5-large": ("configs/coco.py:t5-large", 0, 10),
}
TARGET_LENGTH = 5  # L = 4 vokens + EOS


def step_flops(compiled) -> float:
  """FLOPs of one step on one device, from XLA's cost analysis of the compiled program (0 when
  the backend reports none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def measure(
  spec: str, batch: int, steps: int, dtype: str = "float32", peak_tflops: float = 0.0
) -> dict:
  """Examples/s (and FLOPs, MFU when `peak_tflops` per device is given) of the generative train
  step for the config `spec` on all local devices; `batch` 0 means `train.batch_size`."""
  import jax

  from avg_jax import config as config_lib
  from avg_jax import loop, partitioning
  from avg_jax.models import t5 as t5_lib
  from avg_jax.models.t5_config import T5Config
  from avg_jax.training import generative, optim
  from avg_jax.training import state as state_lib
  from avg_jax.vokens import VokenVocabulary

  config = config_lib.load_config(spec, [f"t5.dtype={dtype}"])
  batch = int(batch) or int(config.train.batch_size)
  vocab = VokenVocabulary(
    int(config.t5.vocab_size),
    int(config.tokenizer.codebook_size),
    int(config.tokenizer.num_levels),
    bool(config.tokenizer.shared_codebook),
    disambiguation_size=8,
  )
  cfg = T5Config.from_config(config.t5, vocab)
  # Parameters and optimizer state shard over all devices (fsdp): replicated on 8 fake
  # devices, T5-base's state would need 8 copies of host memory.
  mesh = partitioning.make_mesh({"data": 1, "fsdp": -1})
  tx = optim.adamw(1e-4, grad_clip_norm=1.0)
  variables, _ = partitioning.sharded_init(
    t5_lib.init_variables, mesh, jax.random.key(0), static=(cfg,)
  )
  state, shardings = state_lib.create_state(variables["params"], tx, mesh)
  rng = np.random.default_rng(0)
  source = int(config.text_tokenizer.max_length)
  host = {
    "inputs": rng.integers(3, vocab.text_vocab_size, (batch, source)).astype(np.int32),
    "targets": rng.integers(
      vocab.first_voken_id, vocab.total_vocab_size, (batch, TARGET_LENGTH)
    ).astype(np.int32),
  }
  device_batch = partitioning.shard_host_batch(host, mesh)
  step = generative.compile_step(
    loop.make_train_step(generative.make_loss_fn(cfg, 1.0), tx), mesh, shardings, device_batch
  )
  key = jax.random.key(1)
  with partitioning.activation_context(mesh):
    # The AOT-compiled program is the one that runs: calling the jitted `step` after
    # `.lower().compile()` would compile it a second time (jit keeps its own cache).
    t0 = time.perf_counter()
    compiled = step.lower(state, device_batch, key).compile()
    compile_s = time.perf_counter() - t0
    flops = step_flops(compiled) * jax.device_count()
    state, metrics = compiled(state, device_batch, key)  # warm-up: first-run allocations
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, device_batch, key)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {
    "config": spec,
    "devices": jax.device_count(),
    "batch": batch,
    "source_length": source,
    "target_length": TARGET_LENGTH,
    "params_millions": params / 1e6,
    "d_model": cfg.d_model,
    "layers": cfg.num_encoder_layers,
    "step_s": seconds,
    "compile_s": compile_s,
    "examples_per_s": batch / seconds,
    "target_tokens_per_s": batch * TARGET_LENGTH / seconds,
    "dtype": dtype,
    "backend": jax.default_backend(),
    "flops_per_step": flops,
    "achieved_tflops": flops / seconds / 1e12,
    "mfu": (flops / seconds / 1e12 / (peak_tflops * jax.device_count()) if peak_tflops else None),
  }


def _measure_all(models: dict, **kwargs) -> list[dict]:
  """`measure` of every `{name: (spec, batch, steps)}`, each row tagged with its name."""
  rows = []
  for name, (spec, batch, steps) in models.items():
    rows.append(dict(measure(spec, batch, steps, **kwargs), model=name))
  return rows


def _worker(models: dict) -> None:
  print("RESULT " + json.dumps(_measure_all(models)), flush=True)


def _accelerator_rows(models: dict, peak_tflops: float, quick: bool) -> list[dict]:
  import jax

  # --quick is allowed on CPU so the test suite exercises this path.
  if jax.default_backend() == "cpu" and not quick:
    raise UserError(
      "bench train --accelerator: no GPU/TPU backend is attached (JAX's default backend is cpu)"
    )
  return _measure_all(models, dtype="bfloat16", peak_tflops=peak_tflops)


def run(config, workdir: str, args) -> dict:
  quick = bool(getattr(args, "quick", False))
  accelerator = bool(getattr(args, "accelerator", False))
  peak = float(getattr(args, "peak_tflops", 0.0) or 0.0)
  if accelerator:
    rows = _accelerator_rows(QUICK_MODELS if quick else ACCELERATOR_MODELS, peak, quick)
  else:
    rows = _cpu_rows(QUICK_MODELS if quick else MODELS)
  print(
    f"{'model':<8} {'backend':>7} {'devices':>7} {'batch':>5} {'params(M)':>9} "
    f"{'step s':>8} {'examples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9}"
  )
  for r in rows:
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "-"
    print(
      f"{r['model']:<8} {r['backend']:>7} {r['devices']:>7} {r['batch']:>5} "
      f"{r['params_millions']:>9.1f} {r['step_s']:>8.3f} {r['examples_per_s']:>10.1f} "
      f"{r['achieved_tflops']:>8.3f} {mfu:>6} {r['compile_s']:>9.1f}"
    )
  result = {
    "bench": "train",
    "quick": quick,
    "accelerator": accelerator,
    "peak_tflops_per_device": peak or None,
    # Other XLA flags change the compiled code, so the figures go with them.
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "machine": common.machine_info(),
    "rows": rows,
    "note": (
      "bfloat16 on the attached accelerator"
      if accelerator
      else "8 fake CPU devices share the same cores: they show sharding overhead, not speed-up"
    ),
  }
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "bench_train.json")
  io.write_json(path, result)
  print(f"wrote {path}")
  return result


def _cpu_rows(models: dict) -> list[dict]:
  rows = []
  for devices in DEVICE_COUNTS:
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=local_multiprocess.xla_flags(os.environ.get("XLA_FLAGS", ""), devices),
    )
    proc = subprocess.run(
      [sys.executable, "-m", "avg_jax.bench.train", json.dumps(models)],
      env=env,
      capture_output=True,
      text=True,
      timeout=3600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"bench train worker ({devices} devices) failed:\n{proc.stderr[-2000:]}")
    rows += json.loads(lines[-1][len("RESULT ") :])
  return rows


if __name__ == "__main__":
  _worker(json.loads(sys.argv[1]))
