"""`avg-jax bench tokenize`: RQ-VAE training and identifier-assignment throughput.

Full size is Flickr30K's: 29,000 training images x 5 captions = 145,000 (image, caption)
pairs of random 768-d embeddings, batch 2048, K = 1024, L = 4 (one shared codebook),
e_dim 768, MLP 768 -> 1024 -> 512 -> 768 and mirror (the reference's settings). It times
k-means initialisation, a bounded number of training steps (not full epochs; the first,
compiling step is timed apart) and assigning identifiers to every image. `--quick` runs a
small model on 10,000 pairs. The PyTorch reference row was measured on this machine earlier
(2 threads, batch 2048) and is printed for comparison, not re-measured.
"""

import json
import os
import time

import jax
import numpy as np

from avg_jax.bench import common
from avg_jax import partitioning
from avg_jax.tokenizer import losses, train
from avg_jax.tokenizer.model import RQVAEConfig

# Measured earlier on this 2-core machine with the reference PyTorch RQ-VAE (not re-measured).
REFERENCE = dict(train_pairs_per_s=2300.0, kmeans_init_s=7.0,
                 note="reference PyTorch RQ-VAE, 2 threads, batch 2048; measured earlier")

SIZES = {
    "full": dict(images=29000, captions_per_image=5, dim=768, batch=2048, codebook=1024,
                 levels=4, e_dim=768, hidden=(1024, 512), warmup_steps=2, timed_steps=10),
    "quick": dict(images=2000, captions_per_image=5, dim=64, batch=256, codebook=64, levels=3,
                  e_dim=64, hidden=(128, 64), warmup_steps=1, timed_steps=3),
}


def _machine() -> dict:
  return common.machine_info()


def measure(size: dict, mesh, *, kmeans_iters: int, seed: int = 0) -> dict:
  """Runs the timed work for one size; returns the measured numbers."""
  rng = np.random.default_rng(seed)
  n_img, per = size["images"], size["captions_per_image"]
  images = rng.standard_normal((n_img, size["dim"]), np.float32)
  index = np.repeat(np.arange(n_img), per)
  captions = rng.standard_normal((n_img * per, size["dim"]), np.float32)
  cfg = RQVAEConfig(in_dim=size["dim"], e_dim=size["e_dim"], hidden_dims=tuple(size["hidden"]),
                    codebook_size=size["codebook"], num_levels=size["levels"],
                    shared_codebook=True, dropout=0.25)
  trainer = train.RQVAETrainer(cfg, losses.LossWeights(), mesh,
                               train.TrainOptions(learning_rate=1e-4, kmeans_iters=kmeans_iters,
                                                  seed=seed), size["batch"])
  sampler = train.PairSampler(images, captions, index, size["batch"], seed)
  result = dict(pairs=len(captions), images=n_img, batch=size["batch"], K=size["codebook"],
                L=size["levels"], e_dim=size["e_dim"], dim=size["dim"],
                hidden=list(size["hidden"]), kmeans_iters=kmeans_iters)

  state = trainer.init_state()
  first = sampler.batch(0)[0]
  trainer.kmeans_init(state, first).params["codebooks"].block_until_ready()  # compile
  t0 = time.perf_counter()
  state = trainer.kmeans_init(state, first)
  state.params["codebooks"].block_until_ready()
  result["kmeans_init_s"] = time.perf_counter() - t0

  t0 = time.perf_counter()
  state, metrics = trainer.train_step(state, *sampler.batch(0))
  jax.block_until_ready(metrics)
  result["first_step_s"] = time.perf_counter() - t0   # includes compilation
  step = 1
  for _ in range(size["warmup_steps"]):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    step += 1
  jax.block_until_ready(metrics)
  t0, cpu0 = time.perf_counter(), time.process_time()
  for _ in range(size["timed_steps"]):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    step += 1
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - t0
  # CPU seconds of this process per step (all threads): less sensitive to other load.
  result["step_cpu_s"] = (time.process_time() - cpu0) / size["timed_steps"]
  result.update(timed_steps=size["timed_steps"], step_s=elapsed / size["timed_steps"],
                train_pairs_per_s=size["timed_steps"] * size["batch"] / elapsed,
                final_loss=float(metrics["loss"]))

  assign_batch = 4096 if size is SIZES["full"] else 1024
  trainer.assign_codes(state, images[:assign_batch], batch_size=assign_batch)  # compile
  t0, cpu0 = time.perf_counter(), time.process_time()
  codes = trainer.assign_codes(state, images, batch_size=assign_batch)
  elapsed = time.perf_counter() - t0
  result.update(assign_batch=assign_batch, assign_images_per_s=n_img / elapsed,
                assign_images_per_cpu_s=n_img / (time.process_time() - cpu0),
                assign_s=elapsed, distinct_ids=int(len(np.unique(codes, axis=0))))
  return result


def format_table(result: dict, comparable: bool = True) -> str:
  """The results next to the reference row (`comparable=False`: sizes differ, no reference)."""
  rows = [
      ("train pairs/s", f"{result['train_pairs_per_s']:.0f}",
       f"{REFERENCE['train_pairs_per_s']:.0f}"),
      ("train step (s)", f"{result['step_s']:.3f}",
       f"{result['batch'] / REFERENCE['train_pairs_per_s']:.3f}"),
      ("train step CPU time, all threads (s)", f"{result['step_cpu_s']:.3f}", "-"),
      ("first step incl. compile (s)", f"{result['first_step_s']:.1f}", "-"),
      (f"k-means init (s, {result['kmeans_iters']} iters)", f"{result['kmeans_init_s']:.2f}",
       f"{REFERENCE['kmeans_init_s']:.0f}"),
      ("assign images/s", f"{result['assign_images_per_s']:.0f}", "-"),
      ("assign images per CPU second", f"{result['assign_images_per_cpu_s']:.0f}", "-"),
  ]
  width = max(len(r[0]) for r in rows)
  if not comparable:
    return "\n".join([f"{'':{width}} | avg-jax"] + [f"{n:{width}} | {o}" for n, o, _ in rows])
  lines = [f"{'':{width}} | avg-jax   | reference (PyTorch, measured earlier, not re-measured)"]
  lines += [f"{name:{width}} | {ours:9} | {ref}" for name, ours, ref in rows]
  speedup = result["train_pairs_per_s"] / REFERENCE["train_pairs_per_s"]
  lines.append(f"training speed-up over the reference: {speedup:.2f}x")
  return "\n".join(lines)


def run(config, workdir: str, args) -> None:
  """Measures, prints a table and writes `<workdir>/bench_tokenize.json`."""
  name = "quick" if getattr(args, "quick", False) else "full"
  size = SIZES[name]
  mesh = partitioning.make_mesh(config.mesh)
  result = measure(size, mesh, kmeans_iters=int(config.tokenizer.kmeans_iters),
                   seed=int(config.seed))
  header = (f"bench tokenize ({name}): {result['pairs']} pairs x {result['dim']}-d, batch "
            f"{result['batch']}, K={result['K']}, L={result['L']}, e_dim={result['e_dim']}, "
            f"{jax.device_count()} {jax.default_backend()} device(s)")
  print(header + f"; load average {os.getloadavg()[0]:.1f} at the end")
  print(format_table(result, comparable=size is SIZES["full"]))
  if size is SIZES["full"]:
    speedup = result["train_pairs_per_s"] / REFERENCE["train_pairs_per_s"]
  else:
    speedup = None   # different sizes: not comparable with the reference row
  record = dict(bench="tokenize", size=name, machine=_machine(), result=result,
                reference=REFERENCE, speedup_vs_reference=speedup)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "bench_tokenize.json")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)
  print(f"wrote {path}")
