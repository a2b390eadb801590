"""`avg-jax bench decode`: constrained-search throughput, FLOP efficiency and index scaling.

All on CPU. Models are random T5 v1.0 networks (ReLU, tied embeddings) with K = 1024 voken
rows appended, identifiers of L = 4 levels, beam 10, 10 results:

  tiny   d_model 64, 2+2 layers, d_ff 256, text vocabulary 1,000    (per-step overhead)
  small  d_model 256, 4+4 layers, d_ff 1024, T5's 32,128 text rows  (batch 32)
  base   T5-base shapes: d_model 768, 12+12 layers, d_ff 3072       (batch 8)

Queries are random token strings of 8 to 24 tokens, padded to the longest in the batch.
For each model it times our jitted search on an index of N = 5,000 random identifiers (the
default full-vocabulary normalisation; for tiny/small also `voken_logits_only` and an
unconstrained search, whose time ratio is the constraint's overhead), counts the matmul FLOPs
of one search and compares the achieved FLOP/s with this machine's dense-matmul FLOP/s. When
torch and transformers import, the reference path (Hugging Face `generate` with
`prefix_allowed_tokens_fn` over a Python dict trie, with and without the KV cache) runs on the
same weights. Then it builds indexes of N = 1K, 10K, 100K, 1M random identifiers and reports
trie build time, device bytes per image and queries/s with the small model.
`--quick`: the tiny model and N up to 10K only.

Fairness: the reference runs in its own process (`reference_worker`: `OMP_WAIT_POLICY=PASSIVE`,
as many torch threads as this process's CPU affinity allows) on the same weights, queries,
trie and full vocabulary; after a warm-up call of every contender, rounds of ours and of the
reference alternate and each side's median is kept. Ours is the public `constrained_search`
under the process setting the product applies (`avg_jax.runtime.prefer_heap_allocations`).
"""

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from avg_jax import runtime
from avg_jax.artifacts import io
from avg_jax.bench import common, reference_worker
from avg_jax.decoding import search as search_lib
from avg_jax.decoding.trie import VokenTrie
from avg_jax.models import t5 as t5_lib
from avg_jax.models.t5_config import T5Config
from avg_jax.vokens import EOS_ID, VokenVocabulary

CODEBOOK, LEVELS, BEAM, INDEX_N = 1024, 4, 10, 5000
K = TypeVar("K")  # a contender's name in `_race`

MODELS = {
  "tiny": dict(text_vocab=1000, d_model=64, d_kv=16, heads=4, d_ff=256, layers=2, batch=32),
  "small": dict(text_vocab=32128, d_model=256, d_kv=64, heads=4, d_ff=1024, layers=4, batch=32),
  "base": dict(text_vocab=32128, d_model=768, d_kv=64, heads=12, d_ff=3072, layers=12, batch=8),
}
INDEX_SIZES = {"full": (1_000, 10_000, 100_000, 1_000_000), "quick": (1_000, 10_000)}
GOALS = dict(
  matmul_fraction=0.5,
  speedup_vs_reference_uncached=3.0,
  qps_1m_over_1k=0.85,
  constraint_overhead=1.1,
  trie_bytes_per_image=48,
  trie_build_s_1m=10.0,
)


# --- measurement helpers -----------------------------------------------------------------------


def _command(args: Any) -> str:
  parts = [
    "avg-jax",
    "bench",
    "decode",
    "--config",
    str(getattr(args, "config", "")),
    "--workdir",
    str(getattr(args, "workdir", "")),
  ]
  return " ".join(parts + (["--quick"] if getattr(args, "quick", False) else []))


def _machine() -> dict:
  return common.machine_info()


def _race(fns: dict[K, Callable[[], Any]], rounds: int) -> dict[K, tuple[float, float]]:
  """`{name: (first call seconds incl. compile, median seconds of `rounds` calls)}`.

  Every contender is called once (warm-up, compile), then the rounds call them in turn, so a
  change of machine load affects all of them alike. A callable returns None (timed here) or
  its own measured seconds (a reference worker's).
  """

  def timed(fn):
    start = time.perf_counter()
    out = fn()
    if isinstance(out, float):
      return out
    jax.block_until_ready(out)
    return time.perf_counter() - start

  first = {name: timed(fn) for name, fn in fns.items()}
  samples: dict[K, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      samples[name].append(timed(fn))
  return {name: (first[name], float(np.median(samples[name]))) for name in fns}


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
  """This machine's dense float32 matmul rate (jitted `[n, n] @ [n, n]`, best of repeats)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def search_flops(
  cfg: T5Config, batch: int, input_length: int, beam: int, id_length: int, output_rows: int
) -> dict:
  """Matmul FLOPs (2 per multiply-add) of one search over `batch` queries.

  Counts what the compiled program computes: the encoder over the padded input, the
  cross-attention K/V once, step 0 on `batch` rows and steps 1..P (P = `id_length`, the last
  predicting EOS) on `batch * beam` rows; self-attention runs over the whole `P + 1`-slot
  cache (masked), the output projection over `output_rows` rows.
  """
  d, hd, f, s = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, input_length
  ffn = 2 * d * f * (3 if cfg.gated else 2)
  enc_token = 2 * 4 * d * hd + 2 * 2 * s * hd + ffn
  encoder = batch * s * cfg.num_encoder_layers * enc_token
  cross_kv = batch * s * cfg.num_decoder_layers * 2 * 2 * d * hd
  cache_len = id_length + 1
  dec_row = (
    cfg.num_decoder_layers
    * (
      2 * 4 * d * hd
      + 2 * 2 * cache_len * hd  # self-attn
      + 2 * 2 * d * hd
      + 2 * 2 * s * hd  # cross-attn
      + ffn
    )
    + 2 * d * output_rows
  )
  rows = batch + id_length * batch * beam
  decoder = rows * dec_row
  return dict(
    encoder=encoder,
    cross_kv=cross_kv,
    decoder=decoder,
    total=encoder + cross_kv + decoder,
    decoder_rows=rows,
  )


def _queries(rng: np.random.Generator, batch: int, text_vocab: int) -> np.ndarray:
  lengths = rng.integers(8, 25, batch)
  tokens = np.zeros((batch, int(lengths.max())), np.int32)
  for i, n in enumerate(lengths):  # tiny host-side loop over a batch of queries
    tokens[i, :n] = rng.integers(3, text_vocab, n)
  return tokens


def _model(name: str, seed: int) -> tuple[T5Config, VokenVocabulary, Any]:
  m = MODELS[name]
  vocab = VokenVocabulary(
    text_vocab_size=m["text_vocab"], codebook_size=CODEBOOK, num_levels=LEVELS
  )
  cfg = T5Config(
    vocab_size=vocab.total_vocab_size,
    num_voken_tokens=vocab.num_voken_tokens,
    d_model=m["d_model"],
    d_kv=m["d_kv"],
    d_ff=m["d_ff"],
    num_heads=m["heads"],
    num_encoder_layers=m["layers"],
    num_decoder_layers=m["layers"],
    dropout_rate=0.0,
  )
  return cfg, vocab, t5_lib.init_params(cfg, jax.random.key(seed))


def _random_index(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.integers(0, CODEBOOK, (n, LEVELS), dtype=np.int64)


# --- the reference path (optional: torch + transformers) ----------------------------------------


class _DictTrie:
  """The reference's trie: nested dicts over token ids from the decoder start token."""

  def __init__(self, token_rows: np.ndarray):
    self.root: dict = {}
    for row in token_rows.tolist():
      node = self.root
      for t in [0] + row + [EOS_ID]:
        node = node.setdefault(t, {})

  def allowed(self, prefix: list[int]) -> list[int]:
    node = self.root
    for t in prefix:
      child = node.get(t)
      if child is None:
        return []
      node = child
    return list(node)


def write_reference_payload(
  folder: str, cfg: T5Config, vocab: VokenVocabulary, params, codes: np.ndarray, queries: np.ndarray
) -> None:
  """The reference worker's inputs: Hugging Face weights and the same queries and index."""
  from avg_jax.models import t5_hf

  t5_hf.save_hf_t5(os.path.join(folder, "hf"), jax.device_get(params), cfg)
  np.savez(
    os.path.join(folder, "inputs.npz"),
    queries=queries,
    tokens=vocab.codes_to_tokens(codes),
    id_length=vocab.id_length,
    first_voken_id=vocab.first_voken_id,
  )


def reference_setup(folder: str) -> dict:
  """(In the reference worker.) Hugging Face `generate` with `prefix_allowed_tokens_fn` over a
  dict trie, uncached and cached, and its top-1 identifier tokens per query."""
  import torch
  import transformers

  model = transformers.T5ForConditionalGeneration.from_pretrained(os.path.join(folder, "hf")).eval()
  with np.load(os.path.join(folder, "inputs.npz")) as f:
    queries, tokens = f["queries"], f["tokens"]
    p = int(f["id_length"])
  trie = _DictTrie(tokens)
  input_ids = torch.as_tensor(queries, dtype=torch.long)
  mask = (input_ids != 0).long()

  def generate(use_cache):
    with torch.no_grad():
      return model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        num_beams=BEAM,
        num_return_sequences=BEAM,
        max_new_tokens=p + 1,
        length_penalty=1.0,
        early_stopping=True,
        do_sample=False,
        use_cache=use_cache,
        prefix_allowed_tokens_fn=lambda b, ids: trie.allowed(ids.tolist()),
      )

  def top1():
    seqs = generate(True).numpy().reshape(len(queries), BEAM, -1)
    return seqs[:, 0, 1 : 1 + p].tolist()

  return {"uncached": lambda: generate(False), "cached": lambda: generate(True), "top1": top1}


# --- the measurements ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  kind: str
  model: str
  n: int
  batch: int
  qps: float
  ref_uncached: float | None = None
  ref_cached: float | None = None
  gflop_per_query: float | None = None
  gflop_per_s: float | None = None
  matmul_fraction: float | None = None
  bytes_per_image: float | None = None
  build_s: float | None = None
  compile_s: float | None = None
  note: str = ""


def measure_model(
  name: str, seed: int, matmul: float, with_reference: bool, rounds: int, variants: bool
) -> tuple[list[Row], dict]:
  m = MODELS[name]
  rng = np.random.default_rng(seed)
  cfg, vocab, params = _model(name, seed)
  codes = _random_index(rng, INDEX_N)
  trie = VokenTrie.build(codes, None, vocab.position_sizes())
  device_trie = trie.to_device(1)
  queries = _queries(rng, m["batch"], m["text_vocab"])
  b, s = queries.shape

  def ours(trie_arg, voken_only=False):
    # The public entry with numpy queries, as a user calls it.
    return lambda: search_lib.constrained_search(
      params, cfg, trie_arg, vocab, queries, beam_size=BEAM, voken_logits_only=voken_only
    )

  contenders = {"search": ours(device_trie)}
  if variants:
    contenders.update(vokens=ours(device_trie, True), unconstrained=ours(None))
  worker, tmp = None, None
  if with_reference:
    tmp = tempfile.TemporaryDirectory()
    write_reference_payload(tmp.name, cfg, vocab, params, codes, queries)
    worker = reference_worker.ReferenceWorker("avg_jax.bench.decode:reference_setup", tmp.name)
    contenders.update(
      ref_uncached=lambda: worker.time("uncached"), ref_cached=lambda: worker.time("cached")
    )
  try:
    times = _race(contenders, rounds)
    ref_top1 = np.asarray(worker.call("top1")) if worker else None
  finally:
    if worker:
      worker.close()
    if tmp is not None:
      tmp.cleanup()
  first, med = times["search"]
  flops = search_flops(cfg, b, s, BEAM, vocab.id_length, cfg.vocab_size)
  rows = [
    Row(
      "search",
      name,
      INDEX_N,
      b,
      b / med,
      gflop_per_query=flops["total"] / b / 1e9,
      gflop_per_s=flops["total"] / med / 1e9,
      matmul_fraction=flops["total"] / med / matmul,
      compile_s=first,
      note="full-vocab log_softmax (reference semantics)",
    )
  ]
  detail = dict(model=m, flops=flops, search_s=med, input_length=s, rounds=rounds)
  if variants:
    flops_v = search_flops(cfg, b, s, BEAM, vocab.id_length, 1 + vocab.num_voken_tokens)
    first_v, med_v = times["vokens"]
    rows.append(
      Row(
        "search voken_logits_only",
        name,
        INDEX_N,
        b,
        b / med_v,
        gflop_per_query=flops_v["total"] / b / 1e9,
        gflop_per_s=flops_v["total"] / med_v / 1e9,
        matmul_fraction=flops_v["total"] / med_v / matmul,
        compile_s=first_v,
        note="log_softmax over EOS + voken rows",
      )
    )
    first_u, med_u = times["unconstrained"]
    rows.append(
      Row(
        "unconstrained",
        name,
        0,
        b,
        b / med_u,
        compile_s=first_u,
        note=f"constraint overhead {med / med_u:.3f}x",
      )
    )
    detail["constraint_overhead"] = med / med_u
  if worker:
    ref_u, ref_c = b / times["ref_uncached"][1], b / times["ref_cached"][1]
    rows[0].ref_uncached, rows[0].ref_cached = ref_u, ref_c
    ours_top1 = np.asarray(contenders["search"]().codes)[:, 0]
    assert ref_top1 is not None  # read whenever there is a worker
    agree = float(np.mean(np.all(vocab.tokens_to_codes(ref_top1) == ours_top1, axis=-1)))
    detail.update(
      reference_measured=dict(uncached=ref_u, cached=ref_c, threads=worker.info["threads"]),
      top1_agreement=agree,
    )
    rows[0].note += (
      f"; reference: {worker.info['threads']} torch threads, PASSIVE; top-1 "
      f"agrees with it on {agree:.0%} of queries"
    )
  return rows, detail


def measure_index_sizes(
  name: str, sizes: tuple[int, ...], seed: int, rounds: int
) -> tuple[list[Row], dict]:
  m = MODELS[name]
  rng = np.random.default_rng(seed + 1)
  cfg, vocab, params = _model(name, seed)
  q = jnp.asarray(_queries(rng, m["batch"], m["text_vocab"]))
  tries, builds = {}, {}
  for n in sizes:
    codes = _random_index(rng, n)
    start = time.perf_counter()
    trie = VokenTrie.build(codes, None, vocab.position_sizes())
    builds[n] = time.perf_counter() - start
    tries[n] = (trie.nbytes, trie.to_device(1))
    del trie, codes

  def ours(device_trie):
    return lambda: search_lib.constrained_search(params, cfg, device_trie, vocab, q, beam_size=BEAM)

  times = _race({n: ours(t) for n, (_, t) in tries.items()}, rounds)
  rows, detail = [], {}
  for n in sizes:
    host_bytes, device_trie = tries[n]
    first, best = times[n]
    rows.append(
      Row(
        "index",
        name,
        n,
        q.shape[0],
        q.shape[0] / best,
        bytes_per_image=device_trie.nbytes / n,
        build_s=builds[n],
        compile_s=first,
        note=f"window widths {list(device_trie.widths)}",
      )
    )
    detail[n] = dict(
      qps=q.shape[0] / best,
      build_s=builds[n],
      device_bytes=device_trie.nbytes,
      host_bytes=host_bytes,
      widths=list(device_trie.widths),
    )
  return rows, detail


def goal_checks(rows: list[Row], details: dict, index_detail: dict) -> list[dict]:
  """The issue's goals, each `{"goal", "measured", "met", "detail"}` (those measurable)."""
  out = []

  def add(goal, measured, met, detail):
    out.append(dict(goal=goal, measured=float(measured), met=bool(met), detail=detail))

  model = "small" if "small" in details else "tiny"
  main = next(r for r in rows if r.kind == "search" and r.model == model)
  fraction = main.matmul_fraction
  assert fraction is not None  # set on every search row
  add(
    f"{model} FLOP/s >= {GOALS['matmul_fraction']:.0%} of matmul",
    fraction,
    fraction >= GOALS["matmul_fraction"],
    f"{main.gflop_per_s:.1f} GFLOP/s, full-vocabulary search",
  )
  ref = details[model].get("reference_measured")
  if ref:
    x = main.qps / ref["uncached"]
    add(
      f"{model} q/s >= {GOALS['speedup_vs_reference_uncached']:g}x reference uncached",
      x,
      x >= GOALS["speedup_vs_reference_uncached"],
      f"{main.qps:.1f} vs {ref['uncached']:.1f} q/s re-measured here",
    )
  if "constraint_overhead" in details[model]:
    x = details[model]["constraint_overhead"]
    add(
      f"{model} constrained / unconstrained time <= {GOALS['constraint_overhead']}",
      x,
      x <= GOALS["constraint_overhead"],
      "whole-search time ratio",
    )
  sizes = sorted(index_detail)
  small, large = index_detail[sizes[0]], index_detail[sizes[-1]]
  x = large["qps"] / small["qps"]
  add(
    f"q/s at N={sizes[-1]:,} >= {GOALS['qps_1m_over_1k']} x q/s at N={sizes[0]:,}",
    x,
    x >= GOALS["qps_1m_over_1k"],
    f"{large['qps']:.1f} vs {small['qps']:.1f} q/s",
  )
  x = large["device_bytes"] / sizes[-1]
  add(
    f"trie bytes per image at N={sizes[-1]:,} <= {GOALS['trie_bytes_per_image']}",
    x,
    x <= GOALS["trie_bytes_per_image"],
    "device arrays",
  )
  add(
    f"trie build seconds at N={sizes[-1]:,} <= {GOALS['trie_build_s_1m']:g}",
    large["build_s"],
    large["build_s"] <= GOALS["trie_build_s_1m"],
    "numpy, vectorised",
  )
  return out


def format_table(rows: list[Row]) -> str:
  def f(x, spec):
    return "-" if x is None else format(x, spec)

  header = (
    "kind",
    "model",
    "N",
    "batch",
    "q/s",
    "ref q/s nocache",
    "ref q/s cache",
    "x ref nocache",
    "GFLOP/q",
    "GFLOP/s",
    "% matmul",
    "B/image",
    "build s",
    "compile s",
    "note",
  )
  lines = []
  for r in rows:
    speed = r.qps / r.ref_uncached if r.ref_uncached else None
    lines.append(
      (
        r.kind,
        r.model,
        f"{r.n:,}" if r.n else "-",
        str(r.batch),
        f(r.qps, ".1f"),
        f(r.ref_uncached, ".1f"),
        f(r.ref_cached, ".1f"),
        f(speed, ".2f"),
        f(r.gflop_per_query, ".2f"),
        f(r.gflop_per_s, ".1f"),
        f(None if r.matmul_fraction is None else 100 * r.matmul_fraction, ".0f"),
        f(r.bytes_per_image, ".1f"),
        f(r.build_s, ".2f"),
        f(r.compile_s, ".1f"),
        r.note,
      )
    )
  widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
  fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(row) for row in lines])


def run(config, workdir: str, args) -> None:
  """Measures, prints one table and writes `<workdir>/bench_decode.json`."""
  quick = bool(getattr(args, "quick", False))
  seed = int(config.seed)
  heap = runtime.prefer_heap_allocations()  # as every avg-jax process does (the product)
  with_reference = reference_worker.available()
  matmul = matmul_flops_per_s(1024 if quick else 2048)
  models = ("tiny",) if quick else ("tiny", "small", "base")
  rows, details = [], {}
  for name in models:
    model_rows, detail = measure_model(
      name, seed, matmul, with_reference, rounds=5 if name != "base" else 3, variants=name != "base"
    )
    rows += model_rows
    details[name] = detail
  index_model = "tiny" if quick else "small"
  index_rows, index_detail = measure_index_sizes(
    index_model, INDEX_SIZES["quick" if quick else "full"], seed, rounds=5
  )
  rows += index_rows
  goals = goal_checks(rows, details, index_detail)
  summary = dict(
    matmul_gflop_per_s=matmul / 1e9, heap_allocations=heap, goals={g["goal"]: g for g in goals}
  )
  print(
    f"bench decode ({'quick' if quick else 'full'}): beam {BEAM}, top {BEAM}, K={CODEBOOK}, "
    f"L={LEVELS}, {jax.device_count()} {jax.default_backend()} device(s); dense matmul "
    f"{matmul / 1e9:.1f} GFLOP/s; reference {'measured' if with_reference else 'skipped'}; "
    f"times are medians of interleaved rounds after a warm-up"
  )
  print(format_table(rows))
  for g in goals:
    print(
      f"goal {g['goal']}: {g['measured']:.3g} ({'met' if g['met'] else 'NOT met'}; {g['detail']})"
    )
  record = dict(
    bench="decode",
    command=_command(args),
    size="quick" if quick else "full",
    machine=_machine(),
    goals=GOALS,
    summary=summary,
    rows=[dataclasses.asdict(r) for r in rows],
    models=details,
    index_sizes={str(k): v for k, v in index_detail.items()},
  )
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "bench_decode.json")
  io.write_json(path, record, default=float)
  print(f"wrote {path}")
