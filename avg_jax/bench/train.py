"""`avg-jax bench train`: generative train-step throughput on CPU, 1 vs 8 (fake) devices.

Each device count runs in its own subprocess (the fake-device count is fixed when XLA starts).
Mesh: `fsdp` over all devices (parameters sharded, batch split). Models: the smoke config's
T5 and T5-base shapes (configs/flickr30k.py), with the real step
(`training.generative.make_loss_fn` + `training.loop.make_train_step`, explicit shardings,
donated state). Batches are random token ids of the configured lengths.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

from avg_jax.bench import common

DEVICE_COUNTS = (1, 8)
# name -> (config spec, global batch, timed steps)
MODELS = {"smoke": ("configs/smoke.py", 128, 10), "t5-base": ("configs/flickr30k.py:t5-base", 8, 3)}
QUICK_MODELS = {"tiny": ("configs/smoke.py:tiny", 32, 5)}
TARGET_LENGTH = 5  # L = 4 vokens + EOS


def measure(spec: str, batch: int, steps: int) -> dict:
  """Examples/s of the generative train step for the config `spec` on all local devices."""
  import jax
  from avg_jax import config as config_lib
  from avg_jax import partitioning
  from avg_jax.models import t5 as t5_lib
  from avg_jax.models.t5_config import T5Config
  from avg_jax.training import generative, loop, optim
  from avg_jax.vokens import VokenVocabulary

  config = config_lib.load_config(spec, ["t5.dtype=float32"])
  vocab = VokenVocabulary(int(config.t5.vocab_size), int(config.tokenizer.codebook_size),
                          int(config.tokenizer.num_levels),
                          bool(config.tokenizer.shared_codebook), disambiguation_size=8)
  cfg = T5Config.from_config(config.t5, vocab)
  # Parameters and optimizer state shard over all devices (fsdp): replicated on 8 fake
  # devices, T5-base's state would need 8 copies of host memory.
  mesh = partitioning.make_mesh({"data": 1, "fsdp": -1})
  tx = optim.adamw(1e-4, grad_clip_norm=1.0)
  variables, _ = partitioning.sharded_init(lambda r: t5_lib.init_variables(cfg, r), mesh,
                                           jax.random.key(0))
  state, shardings = generative.create_state(variables["params"], tx, mesh)
  rng = np.random.default_rng(0)
  source = int(config.text_tokenizer.max_length)
  host = {"inputs": rng.integers(3, vocab.text_vocab_size, (batch, source)).astype(np.int32),
          "targets": rng.integers(vocab.first_voken_id, vocab.total_vocab_size,
                                  (batch, TARGET_LENGTH)).astype(np.int32)}
  device_batch = partitioning.shard_host_batch(host, mesh)
  step = generative.compile_step(
      loop.make_train_step(generative.make_loss_fn(cfg, 1.0), tx), mesh, shardings,
      device_batch)
  key = jax.random.key(1)
  with partitioning.activation_context(mesh):
    t0 = time.perf_counter()
    state, metrics = step(state, device_batch, key)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, device_batch, key)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  return {"config": spec, "devices": jax.device_count(), "batch": batch,
          "source_length": source, "target_length": TARGET_LENGTH,
          "params_millions": params / 1e6, "d_model": cfg.d_model,
          "layers": cfg.num_encoder_layers, "step_s": seconds, "compile_s": compile_s,
          "examples_per_s": batch / seconds,
          "target_tokens_per_s": batch * TARGET_LENGTH / seconds}


def _worker(models: dict) -> None:
  rows = [measure(spec, batch, steps) for spec, batch, steps in models.values()]
  for name, row in zip(models, rows):
    row["model"] = name
  print("RESULT " + json.dumps(rows), flush=True)


def run(config, workdir: str, args) -> dict:
  models = QUICK_MODELS if getattr(args, "quick", False) else MODELS
  rows = []
  for devices in DEVICE_COUNTS:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-m", "avg_jax.bench.train", json.dumps(models)],
                          env=env, capture_output=True, text=True, timeout=3600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
      raise RuntimeError(f"bench train worker ({devices} devices) failed:\n{proc.stderr[-2000:]}")
    rows += json.loads(lines[-1][len("RESULT "):])
  print(f"{'model':<8} {'devices':>7} {'batch':>5} {'params(M)':>9} {'step s':>8} "
        f"{'examples/s':>10} {'compile s':>9}")
  for r in rows:
    print(f"{r['model']:<8} {r['devices']:>7} {r['batch']:>5} {r['params_millions']:>9.1f} "
          f"{r['step_s']:>8.3f} {r['examples_per_s']:>10.1f} {r['compile_s']:>9.1f}")
  result = {"bench": "train", "quick": bool(getattr(args, "quick", False)),
            "machine": common.machine_info(), "rows": rows,
            "note": "8 fake CPU devices share the same cores: they show sharding overhead, "
                    "not speed-up"}
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "bench_train.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  _worker(json.loads(sys.argv[1]))
