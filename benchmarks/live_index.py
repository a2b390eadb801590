"""How fast does the live index grow, and what does a delta cost the search?

Synthetic identifiers (the speed part of the live-index work): a base index of N random
identifiers, then 10K and then 100K more added live (`LiveIndex.add` + `save` + the delta's
device tree, i.e. everything but computing the new images' codes), against a random T5 of the
decode benchmark's sizes. Prints and writes: add throughput (images/s), search queries/s
before and after each addition and after removing as many images as the first addition
added (median of rounds after a warm-up), and the same index built from scratch as one tree
for comparison.

    python benchmarks/live_index.py --out benchmarks/results/live_index.json [--base 1000000]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax import runtime  # noqa: E402
from avg_jax.bench import common  # noqa: E402
from avg_jax.bench import decode as decode_bench  # noqa: E402
from avg_jax.decoding import search as search_lib  # noqa: E402
from avg_jax.decoding.trie import VokenTrie  # noqa: E402
from avg_jax.inference import live_index  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--base", type=int, default=1_000_000)
  parser.add_argument("--adds", default="10000,100000")
  parser.add_argument("--model", default="small", choices=sorted(decode_bench.MODELS))
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  runtime.prefer_heap_allocations()
  adds = [int(a) for a in args.adds.split(",")]
  rng = np.random.default_rng(0)
  cfg, vocab, params = decode_bench._model(args.model, 0)
  sizes = vocab.position_sizes()
  queries = decode_bench._queries(
    rng, decode_bench.MODELS[args.model]["batch"], decode_bench.MODELS[args.model]["text_vocab"]
  )
  codes = decode_bench._random_index(rng, args.base).astype(np.int32)
  ids = np.arange(args.base, dtype=np.int64)
  t0 = time.perf_counter()
  index = live_index.LiveIndex(
    base_ids=ids,
    base_codes=codes,
    base_names=np.full(args.base, "", dtype="<U1"),
    position_sizes=sizes,
    num_levels=len(sizes),
  )
  base_build_s = time.perf_counter() - t0

  def qps(constraint):
    fn = lambda: search_lib.constrained_search(
      params, cfg, constraint, vocab, queries, beam_size=decode_bench.BEAM
    )
    first, med = decode_bench._race({"s": fn}, args.rounds)["s"]
    return queries.shape[0] / med

  rows = [
    dict(
      stage="base",
      added=0,
      indexed=args.base,
      build_s=base_build_s,
      queries_per_s=qps(index.device()),
    )
  ]
  next_id, total = args.base, 0
  with tempfile.TemporaryDirectory() as export:
    for m in adds:
      new_codes = decode_bench._random_index(rng, m).astype(np.int32)
      new_ids = np.arange(next_id, next_id + m, dtype=np.int64)
      next_id += m
      t0 = time.perf_counter()
      with live_index.WriteLock(export):
        index.add(new_ids, new_codes, [""] * m)
        index.save(export)
      constraint = index.device()
      jax.block_until_ready(jax.tree.leaves(constraint))
      add_s = time.perf_counter() - t0
      total += m
      rows.append(
        dict(
          stage=f"+{m:,}",
          added=m,
          indexed=args.base + total,
          add_s=add_s,
          images_per_s=m / add_s,
          delta=total,
          queries_per_s=qps(constraint),
        )
      )
    # Removal: base and added images marked dead, their emptied subtrees masked (an O(nodes)
    # pass over both trees, no rebuild).
    gone = rng.choice(index.all_ids(), size=min(adds[0], len(index.all_ids()) // 2), replace=False)
    t0 = time.perf_counter()
    with live_index.WriteLock(export):
      index.remove(gone)
      index.save(export)
    constraint = index.device()
    jax.block_until_ready(jax.tree.leaves(constraint))
    remove_s = time.perf_counter() - t0
    rows.append(
      dict(
        stage=f"-{len(gone):,} removed",
        added=0,
        indexed=len(index.live_ids()),
        remove_s=remove_s,
        queries_per_s=qps(constraint),
      )
    )
    every = np.concatenate([index.base_codes, index.delta_codes])
    t0 = time.perf_counter()
    whole = VokenTrie.build(every, index.all_ids(), sizes).to_device(1)
    rows.append(
      dict(
        stage="one tree (rebuilt)",
        added=0,
        indexed=len(every),
        build_s=time.perf_counter() - t0,
        queries_per_s=qps(whole),
      )
    )

  print(
    f"live index: {args.model} model, batch {queries.shape[0]}, beam {decode_bench.BEAM}, "
    f"K={decode_bench.CODEBOOK}, L={decode_bench.LEVELS}; medians of {args.rounds} rounds"
  )
  print(
    f"{'stage':<20} {'indexed':>10} {'added':>8} {'images/s':>10} {'add s':>7} "
    f"{'remove s':>8} {'build s':>8} {'q/s':>8}"
  )
  for r in rows:
    print(
      f"{r['stage']:<20} {r['indexed']:>10,} {r['added']:>8,} "
      f"{r.get('images_per_s', float('nan')):>10.0f} {r.get('add_s', float('nan')):>7.2f} "
      f"{r.get('remove_s', float('nan')):>8.2f} {r.get('build_s', float('nan')):>8.2f} "
      f"{r['queries_per_s']:>8.1f}"
    )
  record = dict(
    bench="live_index",
    base=args.base,
    adds=adds,
    model=args.model,
    rows=rows,
    machine=common.machine_info(" ".join([sys.executable] + sys.argv)),
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
