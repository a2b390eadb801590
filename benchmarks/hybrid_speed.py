"""Queries/s of plain AVG and avg_hybrid over N indexed images: interleaved rounds, medians.

Three contenders search the same index (a finished workdir's test images plus random
distractor identifiers and embeddings up to N, as evaluate's efficiency rows build it) with
the workdir's learning-to-rank generator, each starting from the query texts as a user's
request does (T5 tokenization included everywhere):
  avg                          plain constrained beam search (the config's tie-break);
  avg_hybrid (text tower)      + the dual encoder's text tower per query, B dot products;
  avg_hybrid (generator head)  + the query embedding predicted from T5's encoder inside the
                               search program (decode.hybrid_query="generator").
Every contender runs once to compile, then `--rounds` rounds call them in turn (a change of
machine load affects all alike); the table gives median queries/s and the ratio to avg.

    python benchmarks/hybrid_speed.py --workdir runs/main5 --weight 32 \\
        --out benchmarks/results/hybrid_speed.json
"""

import argparse
import dataclasses
import os
import platform
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax import config as config_lib  # noqa: E402
from avg_jax import partitioning, runtime  # noqa: E402
from avg_jax.artifacts import embeddings, io  # noqa: E402
from avg_jax.bench import decode as decode_bench  # noqa: E402
from avg_jax.data import dataset  # noqa: E402
from avg_jax.decoding import search as search_lib  # noqa: E402
from avg_jax.decoding.trie import VokenTrie  # noqa: E402
from avg_jax.encoders import store  # noqa: E402
from avg_jax.evaluation import avg_eval, efficiency  # noqa: E402
from avg_jax.training import query_head_fit  # noqa: E402
from avg_jax.training import state as state_lib  # noqa: E402

NAMES = ("avg", "avg_hybrid (text tower)", "avg_hybrid (generator head)")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a workdir whose rank stage is done")
  parser.add_argument("--config", default="configs/smoke.py")
  parser.add_argument("--protocol", default="transductive")
  parser.add_argument(
    "--weight",
    type=float,
    required=True,
    help="avg_hybrid's fusion weight (evaluate's choice on validation)",
  )
  parser.add_argument("--sizes", default="1000,10000,100000,1000000")
  parser.add_argument("--queries", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  runtime.prefer_heap_allocations()
  config = config_lib.load_config(args.config, [f"protocol={args.protocol}"])
  with partitioning.rules_in_use(config.partitioning.rules):
    rows = run(config, args)
  header = f"{'N':>10} " + " ".join(f"{n:>28}" for n in NAMES)
  print(header)
  for r in rows:
    print(
      f"{r['num_items']:>10,} "
      + " ".join(f"{r[n]:>18.1f} q/s ({r[n] / r['avg']:.2f})" for n in NAMES)
    )
  io.write_json(
    args.out,
    {
      "command": " ".join(["python", "benchmarks/hybrid_speed.py", *(argv or sys.argv[1:])]),
      "machine": {"platform": platform.platform(), "cpus": len(os.sched_getaffinity(0))},
      "queries": args.queries,
      "rounds": args.rounds,
      "weight": args.weight,
      "rows": rows,
    },
    indent=1,
  )
  print(f"wrote {args.out}")
  return 0


def run(config, args) -> list[dict]:
  workdir = args.workdir
  gen, mesh, params, shardings = state_lib.final_params(
    config, workdir, "avg", "rank", args.protocol
  )
  _, texts = dataset.read_texts(workdir, "test")
  texts = texts[: args.queries]
  encoder = store.load_encoder(workdir, mesh)
  head = query_head_fit.fit_query_head(gen, params, mesh, workdir, config)
  test = embeddings.load(workdir, "test")
  plain = avg_eval.eval_decode(config).with_k(int(config.decode.top_k))
  hybrid = dataclasses.replace(plain, hybrid_weight=float(args.weight))
  generator = dataclasses.replace(hybrid, hybrid_query="generator")
  make = lambda d, h=None: search_lib.make_search_fn(
    gen.cfg, gen.vocab, mesh, shardings, d.for_generator(gen.trained_length), query_head=h
  )
  decodes = dict(zip(NAMES, (plain, hybrid, generator)))
  fns = {NAMES[0]: make(plain), NAMES[1]: make(hybrid), NAMES[2]: make(generator, head)}
  batch = avg_eval._global_batch_size(plain.batch_size, mesh)
  max_length = int(config.text_tokenizer.max_length)
  chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]

  def contender(name, trie):
    def go():
      out = None
      for chunk in chunks:
        filler = [chunk[0]] * (batch - len(chunk))  # full batches: one compiled shape
        tokens = partitioning.shard_host_batch(
          gen.tokenizer.encode_batch(chunk + filler, max_length), mesh
        )
        query_emb = None
        if decodes[name].needs_text_tower:  # (plain AVG too under the similarity tie-break)
          query_emb = partitioning.shard_host_batch(
            np.asarray(encoder.encode_texts(chunk + filler, mesh), np.float32), mesh
          )
        out = fns[name](params, trie, tokens, query_emb)
        search_lib.results_to_numpy(out)  # the host copy a caller waits for
      return out

    return go

  image_ids, codes = gen.codes("test")
  sizes_p = gen.vocab.position_sizes()[: gen.trained_length]
  rows = []
  for n in (int(s) for s in args.sizes.split(",")):
    extra = max(n - len(codes), 0)
    fake = efficiency.distractor_codes(codes, sizes_p, extra, 0, distinct=gen.decode.learned_suffix)
    ids = np.concatenate([image_ids, image_ids.max() + 1 + np.arange(extra)])
    emb = np.concatenate(
      [test["image_emb"], efficiency.distractor_embeddings(test["image_emb"], extra, 0)]
    )
    trie = VokenTrie.build(np.concatenate([codes, fake]), ids, position_sizes=sizes_p).to_device(
      dense_levels=plain.dense_levels,
      sharding=partitioning.replicated(mesh),
      item_embeddings=(ids, emb),
    )
    timings = decode_bench._race({name: contender(name, trie) for name in NAMES}, args.rounds)
    row = {"num_items": n, "max_group": int(trie.max_group)}
    row.update({name: len(texts) / med for name, (_, med) in timings.items()})
    rows.append(row)
    print(f"N={n:,}: " + ", ".join(f"{k} {row[k]:.1f} q/s" for k in NAMES), flush=True)
  return rows


if __name__ == "__main__":
  sys.exit(main())
