"""`avg-jax bench tokenize`: RQ-VAE training and identifier-assignment throughput.

Full size is Flickr30K's: 29,000 training images x 5 captions = 145,000 (image, caption)
pairs of random 768-d embeddings, batch 2048, K = 1024, L = 4 (one shared codebook),
e_dim 768, MLP 768 -> 1024 -> 512 -> 768 and mirror (the reference's settings). It times
k-means initialisation, a bounded number of training steps (not full epochs; the first,
compiling step is timed apart) and assigning identifiers to every image. `--quick` runs a
small model on 10,000 pairs.

With the reference extra installed (torch), a PyTorch RQ-VAE of the same shapes (the
reference's MLP of Dropout -> Linear -> BatchNorm -> ReLU layers, one shared codebook applied
L times, the same three losses, AdamW) runs in its own process (`reference_worker`:
`OMP_WAIT_POLICY=PASSIVE`, affinity-limited threads); its training steps alternate with ours
after a warm-up and each side's median step time is compared. Without it, the row printed is
`REFERENCE_HISTORICAL`, measured once on another day, and labelled as such.
"""

import json
import os
import tempfile
import time

import jax
import numpy as np

from avg_jax import partitioning
from avg_jax.artifacts import io
from avg_jax.bench import common, reference_worker
from avg_jax.tokenizer import losses, train
from avg_jax.tokenizer.model import RQVAEConfig

# Historical: measured once on 2026-11-28 with the reference PyTorch RQ-VAE (2 threads, batch
# 2048, busy-waiting OpenMP); printed only when torch is not installed, never as a goal.
REFERENCE_HISTORICAL = dict(
  train_pairs_per_s=2300.0,
  kmeans_init_s=7.0,
  note="historical: reference PyTorch RQ-VAE, 2 threads, batch 2048, "
  "measured 2026-11-28, not in this run",
)
ROUNDS = 7

SIZES = {
  "full": dict(
    images=29000,
    captions_per_image=5,
    dim=768,
    batch=2048,
    codebook=1024,
    levels=4,
    e_dim=768,
    hidden=(1024, 512),
    warmup_steps=2,
    timed_steps=10,
  ),
  "quick": dict(
    images=2000,
    captions_per_image=5,
    dim=64,
    batch=256,
    codebook=64,
    levels=3,
    e_dim=64,
    hidden=(128, 64),
    warmup_steps=1,
    timed_steps=3,
  ),
}


def _machine() -> dict:
  return common.machine_info()


def reference_setup(folder: str) -> dict:
  """(In the reference worker.) One PyTorch RQ-VAE training step at the sizes in
  `folder/size.json`: `{"step": callable}`."""
  import torch
  from torch import nn

  with open(os.path.join(folder, "size.json"), encoding="utf-8") as f:
    size = json.load(f)
  torch.manual_seed(0)

  def mlp(dims):
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      layers += [nn.Dropout(0.25), nn.Linear(a, b), nn.BatchNorm1d(b)]
      if i < len(dims) - 2:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)

  dims = [size["dim"], *size["hidden"], size["e_dim"]]
  encoder, decoder = mlp(dims), mlp(dims[::-1])
  codebook = nn.Parameter(torch.randn(size["codebook"], size["e_dim"]))
  params = list(encoder.parameters()) + list(decoder.parameters()) + [codebook]
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  gen = torch.Generator().manual_seed(0)
  images = torch.randn(size["batch"], size["dim"], generator=gen)
  captions = torch.randn(size["batch"], size["dim"], generator=gen)

  def step():
    z = encoder(images)
    residual, quantized, quant_loss = z, torch.zeros_like(z), 0.0
    for _ in range(size["levels"]):
      codes = torch.cdist(residual, codebook).argmin(dim=1)
      q = codebook[codes]
      quant_loss = (
        quant_loss
        + ((q - residual.detach()) ** 2).mean()
        + 0.25 * ((q.detach() - residual) ** 2).mean()
      )
      quantized = quantized + q
      residual = residual - q.detach()
    z_q = z + (quantized - z).detach()  # straight-through
    out = decoder(z_q)
    loss = (
      quant_loss / size["levels"] + ((out - images) ** 2).mean() + ((out - captions) ** 2).mean()
    )
    opt.zero_grad()
    loss.backward()
    opt.step()

  return {"step": step}


def measure(
  size: dict,
  mesh,
  *,
  kmeans_iters: int,
  seed: int = 0,
  worker: "reference_worker.ReferenceWorker | None" = None,
) -> dict:
  """Runs the timed work for one size; returns the measured numbers. With `worker`, its
  training steps alternate with ours (`reference_step_s`, medians of `ROUNDS`)."""
  rng = np.random.default_rng(seed)
  n_img, per = size["images"], size["captions_per_image"]
  images = rng.standard_normal((n_img, size["dim"]), np.float32)
  index = np.repeat(np.arange(n_img), per)
  captions = rng.standard_normal((n_img * per, size["dim"]), np.float32)
  cfg = RQVAEConfig(
    in_dim=size["dim"],
    e_dim=size["e_dim"],
    hidden_dims=tuple(size["hidden"]),
    codebook_size=size["codebook"],
    num_levels=size["levels"],
    shared_codebook=True,
    dropout=0.25,
  )
  trainer = train.RQVAETrainer(
    cfg,
    losses.LossWeights(),
    mesh,
    train.TrainOptions(learning_rate=1e-4, kmeans_iters=kmeans_iters, seed=seed),
    size["batch"],
  )
  sampler = train.PairSampler(images, captions, index, size["batch"], seed)
  result = dict(
    pairs=len(captions),
    images=n_img,
    batch=size["batch"],
    K=size["codebook"],
    L=size["levels"],
    e_dim=size["e_dim"],
    dim=size["dim"],
    hidden=list(size["hidden"]),
    kmeans_iters=kmeans_iters,
  )

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
  result["first_step_s"] = time.perf_counter() - t0  # includes compilation
  step = 1
  for _ in range(size["warmup_steps"]):
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    step += 1
  jax.block_until_ready(metrics)
  if worker is not None:
    worker.time("step")  # the reference's warm-up
  ours_s, ref_s, cpu = [], [], 0.0
  for _ in range(ROUNDS if worker is not None else size["timed_steps"]):
    t0, cpu0 = time.perf_counter(), time.process_time()
    state, metrics = trainer.train_step(state, *sampler.batch(step))
    jax.block_until_ready(metrics)
    ours_s.append(time.perf_counter() - t0)
    # CPU seconds of this process per step (all threads): less sensitive to other load.
    cpu += time.process_time() - cpu0
    step += 1
    if worker is not None:
      ref_s.append(worker.time("step"))
  step_s = float(np.median(ours_s))
  result["step_cpu_s"] = cpu / len(ours_s)
  result.update(
    timed_steps=len(ours_s),
    step_s=step_s,
    train_pairs_per_s=size["batch"] / step_s,
    final_loss=float(metrics["loss"]),
  )
  if worker is not None:
    result.update(
      reference_step_s=float(np.median(ref_s)),
      reference_train_pairs_per_s=size["batch"] / float(np.median(ref_s)),
      reference_threads=worker.info["threads"],
    )

  assign_batch = 4096 if size is SIZES["full"] else 1024
  trainer.assign_codes(state, images[:assign_batch], batch_size=assign_batch)  # compile
  t0, cpu0 = time.perf_counter(), time.process_time()
  codes = trainer.assign_codes(state, images, batch_size=assign_batch)
  elapsed = time.perf_counter() - t0
  result.update(
    assign_batch=assign_batch,
    assign_images_per_s=n_img / elapsed,
    assign_images_per_cpu_s=n_img / (time.process_time() - cpu0),
    assign_s=elapsed,
    distinct_ids=int(len(np.unique(codes, axis=0))),
  )
  return result


def format_table(result: dict, comparable: bool = True) -> str:
  """The results next to the reference (this run's, else the historical row; `comparable=
  False`: sizes differ, no reference)."""
  measured = "reference_train_pairs_per_s" in result
  ref_pairs = (
    result["reference_train_pairs_per_s"] if measured else REFERENCE_HISTORICAL["train_pairs_per_s"]
  )
  rows = [
    ("train pairs/s", f"{result['train_pairs_per_s']:.0f}", f"{ref_pairs:.0f}"),
    ("train step (s)", f"{result['step_s']:.3f}", f"{result['batch'] / ref_pairs:.3f}"),
    ("train step CPU time, all threads (s)", f"{result['step_cpu_s']:.3f}", "-"),
    ("first step incl. compile (s)", f"{result['first_step_s']:.1f}", "-"),
    (
      f"k-means init (s, {result['kmeans_iters']} iters)",
      f"{result['kmeans_init_s']:.2f}",
      "-" if measured else f"{REFERENCE_HISTORICAL['kmeans_init_s']:.0f} (historical)",
    ),
    ("assign images/s", f"{result['assign_images_per_s']:.0f}", "-"),
    ("assign images per CPU second", f"{result['assign_images_per_cpu_s']:.0f}", "-"),
  ]
  width = max(len(r[0]) for r in rows)
  if not comparable and not measured:
    return "\n".join([f"{'':{width}} | avg-jax"] + [f"{n:{width}} | {o}" for n, o, _ in rows])
  label = (
    f"reference (PyTorch, this run: {result['reference_threads']} threads, PASSIVE, "
    f"median of {result['timed_steps']} alternating steps)"
    if measured
    else f"reference ({REFERENCE_HISTORICAL['note']})"
  )
  lines = [f"{'':{width}} | avg-jax   | {label}"]
  lines += [f"{name:{width}} | {ours:9} | {ref}" for name, ours, ref in rows]
  lines.append(
    f"training speed-up over the reference: {result['train_pairs_per_s'] / ref_pairs:.2f}x"
    + ("" if measured else " (against the historical row)")
  )
  return "\n".join(lines)


def run(config, workdir: str, args) -> None:
  """Measures, prints a table and writes `<workdir>/bench_tokenize.json`."""
  name = "quick" if getattr(args, "quick", False) else "full"
  size = SIZES[name]
  mesh = partitioning.make_mesh(config.mesh)
  worker, tmp = None, None
  if reference_worker.available():
    tmp = tempfile.TemporaryDirectory()
    with open(os.path.join(tmp.name, "size.json"), "w", encoding="utf-8") as f:
      json.dump(size, f)
    worker = reference_worker.ReferenceWorker("avg_jax.bench.tokenize:reference_setup", tmp.name)
  try:
    result = measure(
      size,
      mesh,
      kmeans_iters=int(config.tokenizer.kmeans_iters),
      seed=int(config.seed),
      worker=worker,
    )
  finally:
    if worker is not None:
      worker.close()
    if tmp is not None:
      tmp.cleanup()
  header = (
    f"bench tokenize ({name}): {result['pairs']} pairs x {result['dim']}-d, batch "
    f"{result['batch']}, K={result['K']}, L={result['L']}, e_dim={result['e_dim']}, "
    f"{jax.device_count()} {jax.default_backend()} device(s)"
  )
  print(header + f"; load average {os.getloadavg()[0]:.1f} at the end")
  print(format_table(result, comparable=size is SIZES["full"]))
  speedup = None
  if "reference_train_pairs_per_s" in result:
    speedup = result["train_pairs_per_s"] / result["reference_train_pairs_per_s"]
  record = dict(
    bench="tokenize",
    size=name,
    machine=_machine(),
    result=result,
    reference_historical=REFERENCE_HISTORICAL,
    speedup_vs_reference=speedup,
  )
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "bench_tokenize.json")
  io.write_json(path, record)
  print(f"wrote {path}")
