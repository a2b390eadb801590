"""`avg-jax bench embed`: feature-extraction throughput and brute-force retrieval speed.

    avg-jax bench embed --config configs/smoke.py [--quick] [--workdir runs/bench]

1. images/s and captions/s of the dual encoder (random weights, random inputs) for the config's
   encoder and for ViT-B/16 (CLIP ViT-B/16 shapes: 224 px, 12x768 vision, 12x512 text, 77
   tokens), each at a fixed batch, after one compiling call.
2. queries/s of exact cosine top-10 over N random 768-d embeddings (N = 1K ... 1M), at a fixed
   query batch, items sharded over the mesh's data axis.
`--quick`: the config's encoder only and N up to 10K. Writes `<workdir>/bench_embed.json`.
"""

import functools
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from avg_jax import partitioning
from avg_jax.artifacts import io
from avg_jax.bench import common
from avg_jax.encoders import clip, extract, preprocess, retrieval

VIT_B16 = clip.ClipConfig(
  image_size=224,
  patch_size=16,
  vision_width=768,
  vision_layers=12,
  vision_heads=12,
  vision_mlp_dim=3072,
  vocab_size=49408,
  max_text_length=77,
  text_width=512,
  text_layers=12,
  text_heads=8,
  text_mlp_dim=2048,
  projection_dim=512,
)
RETRIEVAL_DIM = 768
RETRIEVAL_K = 10


def _timed(fn, repeats: int) -> float:
  """Seconds per call of `fn` (blocking), after one warm-up (compiling) call."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats


def bench_encoder(
  name: str, cfg: clip.ClipConfig, mesh, *, image_batch: int, text_batch: int, repeats: int
) -> dict:
  """images/s and captions/s of one encoder config."""
  # Random parameters, created sharded as the stage's are.
  init = lambda rng: {"params": clip.init_fn(cfg)(rng)["params"]}
  variables, shardings = partitioning.sharded_init(init, mesh, jax.random.key(0))
  encoder = extract.DualEncoder(
    cfg,
    variables["params"],
    preprocess.PreprocessConfig.for_image_size(cfg.image_size),
    None,
    shardings["params"],
  )
  rng = np.random.default_rng(0)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  image_batch, text_batch = (-(-b // shards) * shards for b in (image_batch, text_batch))
  images = rng.integers(0, 256, (image_batch, cfg.image_size, cfg.image_size, 3), np.uint8)
  tokens = rng.integers(3, cfg.vocab_size, (text_batch, cfg.max_text_length), np.int32)
  tokens[:, -1] = cfg.eos_token_id
  image_fn, text_fn = encoder.image_fn(mesh), encoder.text_fn(mesh)
  place = lambda x, *names: jax.make_array_from_callback(
    x.shape, partitioning.logical_sharding(mesh, *names), lambda idx: x[idx]
  )
  images_dev = place(images, "batch", None, None, None)
  tokens_dev = place(tokens, "batch", None)
  image_s = _timed(lambda: image_fn(encoder.params, images_dev), repeats)
  text_s = _timed(lambda: text_fn(encoder.params, tokens_dev), repeats)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(encoder.params))
  return dict(
    model=name,
    params_millions=round(params / 1e6, 2),
    image_size=cfg.image_size,
    patch_size=cfg.patch_size,
    text_length=cfg.max_text_length,
    image_batch=image_batch,
    text_batch=text_batch,
    repeats=repeats,
    images_per_s=image_batch / image_s,
    captions_per_s=text_batch / text_s,
  )


def bench_retrieval(
  num_items: int, mesh, *, query_batch: int, repeats: int, chunk_size: int
) -> dict:
  """queries/s of exact top-10 over `num_items` random embeddings."""

  class RandomRows:
    """Rows generated on demand, slice by slice, so the host never holds a second copy."""

    shape = (num_items, RETRIEVAL_DIM)

    def __getitem__(self, rows: slice) -> np.ndarray:
      rng = np.random.default_rng([num_items, rows.start or 0])
      return rng.standard_normal((rows.stop - (rows.start or 0), RETRIEVAL_DIM), np.float32)

  start = time.perf_counter()
  index = retrieval.BruteForceIndex(RandomRows(), mesh=mesh, chunk_size=chunk_size)
  jax.block_until_ready(index.items)
  build_s = time.perf_counter() - start
  queries = np.random.default_rng(1).standard_normal((query_batch, RETRIEVAL_DIM), np.float32)
  # A partial, not a lambda: nothing keeps `index` alive past the `del` below.
  per_call = _timed(functools.partial(index.search, queries, RETRIEVAL_K), repeats)
  del index
  return dict(
    num_items=num_items,
    dim=RETRIEVAL_DIM,
    k=RETRIEVAL_K,
    query_batch=query_batch,
    repeats=repeats,
    chunk_size=chunk_size,
    index_build_s=build_s,
    queries_per_s=query_batch / per_call,
    ms_per_batch=1000 * per_call,
  )


def _machine(argv) -> dict:
  return common.machine_info(" ".join(["avg-jax"] + list(argv)))


def _print_tables(result: dict) -> None:
  print(
    f"{'encoder':<10} {'params(M)':>9} {'img batch':>9} {'images/s':>10} "
    f"{'txt batch':>9} {'captions/s':>10}"
  )
  for r in result["encoders"]:
    print(
      f"{r['model']:<10} {r['params_millions']:>9.2f} {r['image_batch']:>9} "
      f"{r['images_per_s']:>10.1f} {r['text_batch']:>9} {r['captions_per_s']:>10.1f}"
    )
  print(
    f"\n{'N':>9} {'dim':>4} {'k':>3} {'q batch':>7} {'ms/batch':>9} {'queries/s':>10} "
    f"{'build s':>8}"
  )
  for r in result["retrieval"]:
    print(
      f"{r['num_items']:>9} {r['dim']:>4} {r['k']:>3} {r['query_batch']:>7} "
      f"{r['ms_per_batch']:>9.1f} {r['queries_per_s']:>10.1f} {r['index_build_s']:>8.1f}"
    )


def run(config: Any, workdir: str, args: Any) -> dict:
  """Runs the benchmark, prints tables, writes `<workdir>/bench_embed.json`; -> the result."""
  quick = bool(getattr(args, "quick", False))
  mesh = partitioning.make_mesh(config.mesh)
  own = clip.ClipConfig.from_config(
    config.encoder, vocab_size=int(config.text_tokenizer.vocab_size), eos_token_id=1, pad_token_id=0
  )
  encoders = [
    bench_encoder(
      "config",
      own,
      mesh,
      image_batch=64 if quick else 256,
      text_batch=64 if quick else 256,
      repeats=1 if quick else 3,
    )
  ]
  if not quick:
    encoders.append(
      bench_encoder("ViT-B/16", VIT_B16, mesh, image_batch=16, text_batch=32, repeats=2)
    )
  sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000, 1_000_000)
  chunk = int(config.encoder_train.retrieval_chunk_size)
  rows = [
    bench_retrieval(
      n, mesh, query_batch=32, repeats=2 if quick or n >= 100_000 else 5, chunk_size=chunk
    )
    for n in sizes
  ]
  result = dict(
    bench="embed",
    quick=quick,
    machine=_machine(sys.argv[1:]),
    mesh=dict(mesh.shape),
    encoders=encoders,
    retrieval=rows,
  )
  _print_tables(result)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "bench_embed.json")
  io.write_json(path, result)
  print(f"\nwrote {path}")
  return result
