"""`avg-jax evaluate`: Recall@K of every method on the test split, efficiency vs N, report.

Methods (`evaluate.methods`): `two_tower` (the dual encoder, brute force), `avg` (generative
only), `avg_ltr` (after learning to rank), `avg_hybrid` (avg_ltr's beam re-ranked by
log-prob + weight x dual-encoder similarity, the weight chosen on validation among
`evaluate.hybrid_weights`), and the identifier-scheme ablations `rq`,
`hkmeans`, `atomic` (and `random`), each with its own generator: their tokenize, train (and
rank) stages run here when missing. Every method is evaluated under each protocol of
`evaluate.protocols` ("transductive": generators trained on the indexed images' pseudo
queries too; "inductive": never seen), the scheme ablations under `evaluate.ablation_protocols`; the two-tower baseline is the same dual encoder under
both (it never sees pseudo queries, as in the paper). Generators report image-level Recall@K
and the paper's code-level Recall@K. Writes `<workdir>/evaluate/metrics.json` and `report.md`
with plots, one `metrics.jsonl` record per (protocol, method), and prints a summary table.
"""

import os
import platform
import time

import jax
import ml_collections
import numpy as np

import avg_jax
from avg_jax import partitioning, processes
from avg_jax.artifacts import (
  checksums,
  embeddings,
  fingerprint,
  locks,
  paths,
  stage_inputs,
  voken_tables,
)
from avg_jax.artifacts import results as results_lib
from avg_jax.data import dataset
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.encoders import store
from avg_jax.errors import UserError
from avg_jax.evaluation import avg_eval, efficiency, hybrid, report, two_tower
from avg_jax.evaluation import recall as recall_lib
from avg_jax.metrics import MetricsWriter
from avg_jax.models import query_head as query_head_lib
from avg_jax.stages import rank, tokenize, train
from avg_jax.tokenizer.fit import tokenizer_name
from avg_jax.tokenizer.model import SCHEMES
from avg_jax.training import examples as examples_lib
from avg_jax.training import query_head_fit
from avg_jax.training import state as state_lib

RESULTS = paths.EVALUATE_RESULTS


def with_scheme(
  config: ml_collections.ConfigDict, scheme: str, protocol: str | None = None
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.tokenizer.scheme = scheme
  if protocol is not None:
    c.protocol = protocol
  c.lock()
  return c


def ensure_generator(config, workdir: str, scheme: str, stage: str, protocol: str) -> None:
  """Runs the tokenize / train (/ rank) stages of (`scheme`, `protocol`) not yet finished
  from this config's settings (a generator of other settings is trained again)."""
  c = with_scheme(config, scheme, protocol)
  tokenize.run(c, workdir)  # keeps a complete voken table
  if not state_lib.is_current(c, workdir, scheme, protocol, "train"):
    train.train_generator(c, workdir, scheme, protocol)
  if stage == "rank" and not state_lib.is_current(c, workdir, scheme, protocol, "rank"):
    rank.rank_generator(c, workdir, scheme, protocol)


def method_plan(methods) -> list[tuple[str, str, str]]:
  """`[(method, scheme, stage)]` for the generator-based methods."""
  plan = []
  for m in methods:
    if m == "two_tower":
      continue
    if m in ("avg_ltr", "avg_hybrid"):
      plan.append((m, "avg", "rank"))
    elif m in SCHEMES:
      plan.append((m, m, "train"))
    else:
      raise UserError(
        f"config evaluate.methods: unknown method {m!r} (known: two_tower, "
        f"avg_ltr, avg_hybrid, {', '.join(SCHEMES)})"
      )
  return plan


def with_hybrid_weight(
  config: ml_collections.ConfigDict, weight: float | None
) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.decode.hybrid_weight = None if weight is None else float(weight)
  c.lock()
  return c


def hybrid_query_head(
  config, workdir: str, scheme: str, stage: str, protocol: str
) -> query_head_lib.QueryHead:
  """avg_hybrid's query head for this generator (`decode.hybrid_query="generator"`), fitted
  on the training captions (training/query_head_fit.py)."""
  gen, gmesh, params, _ = state_lib.final_params(config, workdir, scheme, stage, protocol)
  return query_head_fit.fit_query_head(gen, params, gmesh, workdir, config)


def choose_hybrid_weight(
  config, workdir: str, scheme: str, stage: str, protocol: str, query_head=None
) -> tuple[float, list[dict]]:
  """avg_hybrid's fusion weight, chosen on the validation split: one plain search keeps each
  query's whole beam, every weight of `evaluate.hybrid_weights` re-ranks it (evaluation/
  hybrid.py) with the validation captions' query embeddings: the dual encoder's, or with
  `query_head` the generator's prediction. -> (weight, `[{"weight", "R@1", ...}]`)."""
  weights = [float(w) for w in config.evaluate.hybrid_weights]
  if not weights:
    raise UserError("config evaluate.hybrid_weights is empty (avg_hybrid chooses among them)")
  plain = with_hybrid_weight(config, None)
  beam = avg_eval.eval_decode(plain).beam
  c = ml_collections.ConfigDict(plain.to_dict())
  c.decode.top_k = beam  # the whole beam, as the hybrid search re-ranks it
  c.lock()
  gen, gmesh, params, shardings = state_lib.final_params(c, workdir, scheme, stage, protocol)
  m = avg_eval.evaluate_recall(gen, params, shardings, gmesh, c, workdir, "val")
  val = embeddings.load(workdir, "val")
  ids = m["_results"]["item_ids"]
  query_emb = val["caption_emb"]
  if query_head is not None:
    tokens = query_head_fit.caption_tokens(
      workdir, "val", gen.tokenizer, int(c.text_tokenizer.max_length)
    )
    query_emb = np.asarray(
      query_head_lib.predict(
        query_head, query_head_fit.encoder_features(params, gen.cfg, tokens, gmesh)
      )
    )
  sim = hybrid.candidate_similarities(ids, query_emb, val["image_ids"], val["image_emb"])
  weight, table = hybrid.choose_weight(
    ids,
    m["_results"]["scores"],
    sim,
    m["_true_ids"],
    weights,
    tuple(int(k) for k in config.evaluate.recall_ks),
  )
  print(
    f"evaluate: avg_hybrid ({protocol}) weight {weight:g} chosen on validation "
    f"(R@1 {max(r['R@1'] for r in table):.1f}; plain {table[0]['R@1']:.1f} at weight "
    f"{table[0]['weight']:g})"
  )
  return weight, table


def _results_load(directory: str) -> str:
  """ "" when the stored results are intact (checksums) and parse and the report exists, else
  what is wrong."""
  problem = checksums.verify(directory)
  if problem:
    return problem
  try:
    results_lib.read_file(os.path.join(directory, RESULTS))
  except UserError as e:
    return str(e)
  if not os.path.exists(os.path.join(directory, "report.md")):
    return "report.md missing"
  return ""


@locks.holding("evaluate")
def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  directory = paths.evaluate_dir(workdir)
  # Results depend on the settings of every stage before it (and of the generators it
  # trains): redone when one of them changes (avg_jax/artifacts/stage_inputs.py).
  out = fingerprint.Output(
    directory,
    stage_inputs.inputs("evaluate", config, workdir=workdir),
    stage="evaluate",
    on_other=stage_inputs.STAGES["evaluate"].on_other,
  )
  if out.done(verify=lambda: _results_load(directory)):
    print(report.summary_table(results_lib.read_file(paths.evaluate_results_file(workdir))))
    print(f"evaluate: {directory} is complete for this config; kept")
    return
  out.begin()
  # The generators' stages are checked as they load (training/state.py).
  stage_inputs.require(config, workdir, "prepare", "embed")
  started = time.time()
  ks = tuple(int(k) for k in config.evaluate.recall_ks)
  writer = MetricsWriter(workdir, "evaluate", process_index=jax.process_index())
  mesh = partitioning.make_mesh(config.mesh)
  results = {
    "recall": {},
    "saw_pseudo_queries": {},
    "vs_two_tower": {},
    "efficiency": {},
    "codebook": {},
    "collisions": {},
  }
  methods = tuple(config.evaluate.methods)
  protocols = tuple(pseudo_lib.check_protocol(str(p)) for p in config.evaluate.protocols)
  if not protocols:
    raise UserError("config evaluate.protocols is empty")
  plan = method_plan(methods)
  ablation_protocols = tuple(str(p) for p in config.evaluate.ablation_protocols)
  for p in ablation_protocols:
    pseudo_lib.check_protocol(p)

  test_emb = embeddings.load(workdir, "test")
  baseline = None
  if "two_tower" in methods:
    m = two_tower.recall(test_emb, ks, mesh)
    baseline = {k: m[k] for k in m if k.startswith("R@")}
    two_tower_ranked = m["_ranked_ids"]
    writer.write(method="two_tower", split="test", **{k: v for k, v in m.items() if k[0] != "_"})

  avg_params = None
  for protocol in protocols:
    recall = results["recall"][protocol] = {}
    seen = results["saw_pseudo_queries"][protocol] = {}
    if baseline is not None:
      recall["two_tower"], seen["two_tower"] = dict(baseline), False
    for method, scheme, stage in plan:
      if method not in ("avg", "avg_ltr", "avg_hybrid") and protocol not in ablation_protocols:
        continue
      ensure_generator(config, workdir, scheme, stage, protocol)
      c = with_scheme(config, scheme, protocol)
      head = None
      if method == "avg_hybrid":
        if str(c.decode.hybrid_query) == "generator":
          head = hybrid_query_head(c, workdir, scheme, stage, protocol)
        weight, table = choose_hybrid_weight(c, workdir, scheme, stage, protocol, head)
        results.setdefault("hybrid", {})[protocol] = {
          "weight": weight,
          "query": str(c.decode.hybrid_query),
          "validation": table,
        }
        c = with_hybrid_weight(c, weight)
      gen, gmesh, params, shardings = state_lib.final_params(c, workdir, scheme, stage, protocol)
      m = avg_eval.evaluate_recall(
        gen, params, shardings, gmesh, c, workdir, "test", query_head=head
      )
      public = {k: v for k, v in m.items() if not k.startswith("_")}
      recall[method] = {k: public[k] for k in public if "R@" in k}
      if baseline is not None:  # the same test captions, in the same order
        results["vs_two_tower"].setdefault(protocol, {})[method] = {
          f"R@{k}": recall_lib.paired_difference(
            recall_lib.hits_at_k(m["_results"]["item_ids"], m["_true_ids"], k),
            recall_lib.hits_at_k(two_tower_ranked, test_emb["caption_image_ids"], k),
          )
          for k in ks
        }
      # What training really saw: the indexed images' pseudo queries it had (none when the
      # data has none, whatever the protocol's name promises).
      seen[method] = len(examples_lib.pseudo_examples(workdir, gen, 1)[1])
      writer.write(method=method, protocol=protocol, split="test", **public)
      name = tokenizer_name(c, scheme, protocol)
      summary = voken_tables.load_summary(workdir, name)
      results["collisions"][name] = {s: v["collision_rate"] for s, v in summary["splits"].items()}
      train_stats = summary["splits"].get("train", {})
      if "perplexity" in train_stats:
        results["codebook"][name] = {
          "perplexity": train_stats["perplexity"],
          "unused_share": train_stats["unused_share"],
        }
      if method == "avg" and protocol == config.protocol:
        avg_params = (gen, gmesh, params, shardings, c)

  sizes = tuple(int(n) for n in config.evaluate.efficiency_sizes)
  if sizes and avg_params is not None:
    gen, gmesh, params, shardings, c = avg_params
    n_q = int(config.evaluate.efficiency_queries)
    inputs, _ = avg_eval.query_set(
      workdir, "test", gen.tokenizer, int(c.text_tokenizer.max_length), n_q
    )
    _, texts = dataset.read_texts(workdir, "test")
    encoder = store.load_encoder(workdir, mesh)
    encode_s = efficiency.text_encode_s_per_query(
      encoder, mesh, texts[:n_q], int(config.decode.batch_size)
    )
    similarity = gen.decode.needs_embeddings
    results["efficiency"]["avg"] = efficiency.avg_queries_per_s(
      gen,
      params,
      shardings,
      gmesh,
      c,
      inputs,
      sizes,
      query_emb=test_emb["caption_emb"][:n_q] if similarity else None,
      image_emb=test_emb["image_emb"] if similarity else None,
      encode_s_per_query=encode_s,
    )
    chosen = results.get("hybrid", {}).get(str(c.protocol))
    if chosen is not None:
      # The same search re-ranking its beam: the generator's parameters do not change its cost.
      # With the generator's query head, no text tower runs (its head is fitted for these
      # parameters, so the timed program is the one a user of this generator runs).
      head = None
      if chosen["query"] == "generator":
        head = query_head_fit.fit_query_head(gen, params, gmesh, workdir, c)
      results["efficiency"]["avg_hybrid"] = efficiency.avg_queries_per_s(
        gen,
        params,
        shardings,
        gmesh,
        with_hybrid_weight(c, chosen["weight"]),
        inputs,
        sizes,
        query_emb=None if head is not None else test_emb["caption_emb"][:n_q],
        image_emb=test_emb["image_emb"],
        encode_s_per_query=encode_s,
        query_head=head,
      )
    results["efficiency"]["two_tower"] = efficiency.two_tower_queries_per_s(
      encoder,
      mesh,
      texts[:n_q],
      test_emb["caption_emb"][:n_q],
      sizes,
      k=int(config.decode.top_k),
      batch_size=int(config.decode.batch_size),
      encode_s_per_query=encode_s,
    )
    ef_search = tuple(int(e) for e in config.evaluate.ann_ef_search)
    cap = int(config.evaluate.ann_max_items)
    ann_sizes = tuple(n for n in sizes if not cap or n <= cap)
    if ef_search and ann_sizes:
      frontier = efficiency.ann_queries_per_s(
        test_emb["image_emb"],
        test_emb["caption_emb"][:n_q],
        ann_sizes,
        k=int(config.decode.top_k),
        batch_size=int(config.decode.batch_size),
        m=int(config.evaluate.ann_m),
        ef_construction=int(config.evaluate.ann_ef_construction),
        ef_search=ef_search,
        encode_s_per_query=encode_s,
      )
      results["ann_frontier"] = frontier
      results["efficiency"]["two_tower_hnsw"] = efficiency.fastest_at_recall(
        frontier, float(config.evaluate.ann_target_recall)
      )
    for method, rows in results["efficiency"].items():
      for r in rows:
        writer.write(method=method, split="efficiency", **r)
    measured = {
      m: [r for r in rows if "queries_per_s" in r] for m, rows in results["efficiency"].items()
    }
    results["efficiency"] = measured
    results["crossover"] = report.crossover(
      [results_lib.SpeedRow(**r) for r in measured["avg"]],
      [results_lib.SpeedRow(**r) for r in measured["two_tower"]],
    )

  results["meta"] = {
    "config_hash": fingerprint.config_hash(config),
    "avg_jax": avg_jax.__version__,
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    "test_images": int(len(test_emb["image_ids"])),
    "seconds": round(time.time() - started, 1),
  }
  record = results_lib.from_json(results)
  if processes.is_main():
    results_lib.write(workdir, record)
    report.write_report(record, directory)
    checksums.write(directory)
  out.finish()
  if processes.is_main():
    print(report.summary_table(record))
    print(f"report: {os.path.join(directory, 'report.md')}")
