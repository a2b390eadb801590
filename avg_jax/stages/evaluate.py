"""`avg-jax evaluate`: Recall@K of every method on the test split, efficiency vs N, report.

Methods (`evaluate.methods`): `two_tower` (the dual encoder, brute force), `avg` (generative
only), `avg_ltr` (after learning to rank), `avg_hybrid` (avg_ltr's beam re-ranked by
log-prob + weight x dual-encoder similarity, the weight chosen on validation among
`evaluate.hybrid_weights`), and the identifier-scheme ablations `rq`, `hkmeans`, `atomic`
(and `random`), each with its own generator: their tokenize, train (and rank) stages run here
when missing. Every method is evaluated under each protocol of `evaluate.protocols`
("transductive": generators trained on the indexed images' pseudo queries too; "inductive":
never seen), the scheme ablations under `evaluate.ablation_protocols`; the two-tower baseline
is the same dual encoder under both (it never sees pseudo queries, as in the paper).
Generators report image-level Recall@K and the paper's code-level Recall@K.

`run` in steps: plan the methods (`plan_methods`), train the missing generators
(`train_missing_generators`), choose avg_hybrid's weight on validation
(`choose_hybrid_weights`), evaluate on test (`evaluate_on_test`), time efficiency
(`time_efficiency`), write the record (`write_results`): `<workdir>/evaluate/metrics.json`
(avg_jax/artifacts/results.py) and `report.md` with plots. One `metrics.jsonl` record per
(protocol, method) and per efficiency row; prints a summary table.
"""

import dataclasses
import os
import platform
import time
from typing import Any

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
from avg_jax.decoding.config import DecodeConfig
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
# The methods of the avg generator, evaluated under every protocol (the scheme ablations only
# under `evaluate.ablation_protocols`).
AVG_METHODS = ("avg", "avg_ltr", "avg_hybrid")


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
  c = with_hybrid_weight(config, None)
  plain = avg_eval.eval_decode(c)
  # The whole beam, as the hybrid search re-ranks it.
  whole_beam = dataclasses.replace(plain, top_k=plain.beam)
  gen, gmesh, params, shardings = state_lib.final_params(c, workdir, scheme, stage, protocol)
  m = avg_eval.evaluate_recall(gen, params, shardings, gmesh, c, workdir, "val", decode=whole_beam)
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
  writer = MetricsWriter(workdir, "evaluate", process_index=jax.process_index())
  mesh = partitioning.make_mesh(config.mesh)

  plan = plan_methods(config)
  train_missing_generators(config, workdir, plan)
  hybrids = choose_hybrid_weights(config, workdir, plan)
  test_emb = embeddings.load(workdir, "test")
  tested = evaluate_on_test(config, workdir, plan, hybrids, test_emb, mesh, writer)
  speed = time_efficiency(
    config, workdir, mesh, test_emb, tested.timed, hybrids.get(str(config.protocol)), writer
  )
  results = results_lib.Results(
    methods=tested.methods,
    efficiency=speed.rows if speed else {},
    codebook=tested.codebook,
    collisions=tested.collisions,
    hybrid={protocol: h.choice for protocol, h in hybrids.items()},
    ann_frontier=speed.ann_frontier if speed else (),
    crossover=speed.crossover if speed else None,
    meta=run_meta(config, test_emb, started),
  )
  write_results(workdir, results)

  out.finish()
  if processes.is_main():
    print(report.summary_table(results))
    print(f"report: {os.path.join(directory, 'report.md')}")


# --- 1. Plan the methods ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `run` evaluates."""

  two_tower: bool  # the dual-encoder baseline (brute force), the same under every protocol
  # protocol -> the generator-based methods evaluated under it, `(method, scheme, stage)` in
  # `evaluate.methods` order: avg, avg_ltr and avg_hybrid under every protocol of
  # `evaluate.protocols`, the scheme ablations under `evaluate.ablation_protocols` only.
  generators: dict[str, tuple[tuple[str, str, str], ...]]


def plan_methods(config: ml_collections.ConfigDict) -> Plan:
  """Which method runs under which protocol, from `evaluate.methods`, `evaluate.protocols`
  and `evaluate.ablation_protocols` (a `UserError` names an unknown or missing one)."""
  methods = tuple(config.evaluate.methods)
  protocols = tuple(pseudo_lib.check_protocol(str(p)) for p in config.evaluate.protocols)
  if not protocols:
    raise UserError("config evaluate.protocols is empty")
  plan = method_plan(methods)
  ablation_protocols = tuple(str(p) for p in config.evaluate.ablation_protocols)
  for p in ablation_protocols:
    pseudo_lib.check_protocol(p)
  return Plan(
    two_tower="two_tower" in methods,
    generators={
      protocol: tuple(
        (method, scheme, stage)
        for method, scheme, stage in plan
        if method in AVG_METHODS or protocol in ablation_protocols
      )
      for protocol in protocols
    },
  )


# --- 2. Train missing generators (the ablations') --------------------------------------------


def train_missing_generators(config: ml_collections.ConfigDict, workdir: str, plan: Plan) -> None:
  """Runs the tokenize / train (/ rank) stages of every generator the plan evaluates that are
  not finished for this config (`ensure_generator`): most often the scheme ablations' own."""
  for protocol, generators in plan.generators.items():
    for _, scheme, stage in generators:
      ensure_generator(config, workdir, scheme, stage, protocol)


# --- 3. Choose avg_hybrid's weight on validation ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class HybridSetup:
  """avg_hybrid under one protocol: the weight chosen (with its validation curve) and, with
  `decode.hybrid_query="generator"`, the generator's query head its search uses."""

  choice: results_lib.HybridChoice
  query_head: query_head_lib.QueryHead | None


def choose_hybrid_weights(
  config: ml_collections.ConfigDict, workdir: str, plan: Plan
) -> dict[str, HybridSetup]:
  """protocol -> avg_hybrid's fusion weight, chosen on the validation split
  (`choose_hybrid_weight`), for each protocol the plan evaluates avg_hybrid under. The query
  head (`decode.hybrid_query="generator"`) is fitted here and used on test too."""
  out = {}
  for protocol, generators in plan.generators.items():
    for method, scheme, stage in generators:
      if method != "avg_hybrid":
        continue
      c = with_scheme(config, scheme, protocol)
      query = DecodeConfig.from_config(c.decode).hybrid_query
      head = None
      if query == "generator":
        head = hybrid_query_head(c, workdir, scheme, stage, protocol)
      weight, table = choose_hybrid_weight(c, workdir, scheme, stage, protocol, head)
      trials = tuple(
        results_lib.WeightTrial(row["weight"], {k: v for k, v in row.items() if k != "weight"})
        for row in table
      )
      out[protocol] = HybridSetup(results_lib.HybridChoice(weight, query, trials), head)
  return out


# --- 4. Evaluate on the test split -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A generator's final parameters, loaded for search (`state_lib.final_params`), and the
  config it is searched with."""

  gen: Any
  mesh: Any
  params: Any
  shardings: Any
  config: ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class TestResults:
  """What `evaluate_on_test` measured."""

  methods: dict[str, dict[str, results_lib.MethodResult]]  # protocol -> method -> result
  codebook: dict[str, results_lib.CodebookUsage]  # per voken table used
  collisions: dict[str, dict[str, float]]  # per voken table used: split -> rate
  timed: Loaded | None  # avg under `config.protocol`: the search the efficiency rows time


def evaluate_on_test(
  config: ml_collections.ConfigDict,
  workdir: str,
  plan: Plan,
  hybrids: dict[str, HybridSetup],
  test_emb: dict,
  mesh,
  writer: MetricsWriter,
) -> TestResults:
  """Recall@K of every planned method on the test split, per protocol (avg_hybrid with the
  weight of `hybrids`), and the codebook usage and collision rates of the voken tables of
  the generators evaluated; one metrics.jsonl record per (protocol, method)."""
  ks = tuple(int(k) for k in config.evaluate.recall_ks)
  baseline = None
  if plan.two_tower:
    baseline = two_tower.recall(test_emb, ks, mesh)
    writer.write(
      method="two_tower", split="test", **{k: v for k, v in baseline.items() if k[0] != "_"}
    )
  methods: dict[str, dict[str, results_lib.MethodResult]] = {}
  codebook: dict = {}
  collisions: dict = {}
  timed = None
  for protocol, generators in plan.generators.items():
    by_method = methods[protocol] = {}
    if baseline is not None:
      recall = {k: baseline[k] for k in baseline if k.startswith("R@")}
      by_method["two_tower"] = results_lib.MethodResult(recall, False)
    for method, scheme, stage in generators:
      c = with_scheme(config, scheme, protocol)
      setup = hybrids.get(protocol) if method == "avg_hybrid" else None
      if setup is not None:
        c = with_hybrid_weight(c, setup.choice.weight)
      gen, gmesh, params, shardings = state_lib.final_params(c, workdir, scheme, stage, protocol)
      loaded = Loaded(gen, gmesh, params, shardings, c)
      head = setup.query_head if setup is not None else None
      by_method[method] = evaluate_generator(
        loaded, workdir, method, protocol, head, baseline, test_emb, writer
      )
      name = tokenizer_name(c, scheme, protocol)
      codebook_usage, collisions[name] = voken_table_stats(workdir, name)
      if codebook_usage is not None:
        codebook[name] = codebook_usage
      if method == "avg" and protocol == config.protocol:
        timed = loaded
  return TestResults(methods, codebook, collisions, timed)


def evaluate_generator(
  loaded: Loaded,
  workdir: str,
  method: str,
  protocol: str,
  query_head,
  baseline: dict | None,
  test_emb: dict,
  writer: MetricsWriter,
) -> results_lib.MethodResult:
  """One generator-based method on the test split: image- and code-level Recall@K, the paired
  difference to the two-tower `baseline` (when evaluated) and how many of the indexed images'
  pseudo queries its training saw; its metrics.jsonl record."""
  gen, c = loaded.gen, loaded.config
  m = avg_eval.evaluate_recall(
    gen, loaded.params, loaded.shardings, loaded.mesh, c, workdir, "test", query_head=query_head
  )
  public = {k: v for k, v in m.items() if not k.startswith("_")}
  versus = None
  if baseline is not None:  # the same test captions, in the same order
    versus = {}
    for k in (int(k) for k in c.evaluate.recall_ks):
      d = recall_lib.paired_difference(
        recall_lib.hits_at_k(m["_results"]["item_ids"], m["_true_ids"], k),
        recall_lib.hits_at_k(baseline["_ranked_ids"], test_emb["caption_image_ids"], k),
      )
      versus[f"R@{k}"] = results_lib.PairedDifference(d["diff"], tuple(d["ci95"]))
  # What training really saw: the indexed images' pseudo queries it had (none when the data
  # has none, whatever the protocol's name promises).
  seen = len(examples_lib.pseudo_examples(workdir, gen, 1)[1])
  writer.write(method=method, protocol=protocol, split="test", **public)
  recall = {k: public[k] for k in public if "R@" in k}
  return results_lib.MethodResult(recall, seen, versus)


def voken_table_stats(
  workdir: str, name: str
) -> tuple[results_lib.CodebookUsage | None, dict[str, float]]:
  """`(codebook usage on the training split or None, {split: collision rate})` of the voken
  table `name`, from the summary `tokenize` wrote."""
  summary = voken_tables.load_summary(workdir, name)
  collisions = {s: v["collision_rate"] for s, v in summary["splits"].items()}
  train_stats = summary["splits"].get("train", {})
  if "perplexity" not in train_stats:
    return None, collisions
  usage = results_lib.CodebookUsage(
    tuple(train_stats["perplexity"]), tuple(train_stats["unused_share"])
  )
  return usage, collisions


# --- 5. Time efficiency ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """What `time_efficiency` measured."""

  rows: dict[str, tuple[results_lib.SpeedRow, ...]]  # method -> one row per size indexed
  ann_frontier: tuple[results_lib.AnnPoint, ...]  # empty when HNSW was not timed
  crossover: float | None  # `report.crossover` of avg and two_tower


def time_efficiency(
  config: ml_collections.ConfigDict,
  workdir: str,
  mesh,
  test_emb: dict,
  timed: Loaded | None,
  hybrid_setup: HybridSetup | None,
  writer: MetricsWriter,
) -> Efficiency | None:
  """Queries/s against the number of indexed images (`evaluate.efficiency_sizes`) of avg (the
  `timed` search), avg_hybrid with the weight chosen for this protocol (`hybrid_setup`), the
  brute-force two-tower and, with `evaluate.ann_ef_search`, the two-tower over an HNSW index.
  Every row is a metrics.jsonl record; the sizes a method could not index stay out of the
  results. None when no size is set or avg was not evaluated under `config.protocol`."""
  sizes = tuple(int(n) for n in config.evaluate.efficiency_sizes)
  if not sizes or timed is None:
    return None
  # The search settings of the two-tower rows (the generator's are in `timed.config`).
  decode = DecodeConfig.from_config(config.decode)
  top_k, batch_size = decode.top_k, decode.batch_size
  gen, gmesh, params, shardings = timed.gen, timed.mesh, timed.params, timed.shardings
  c = timed.config
  n_q = int(config.evaluate.efficiency_queries)
  inputs, _ = avg_eval.query_set(
    workdir, "test", gen.tokenizer, int(c.text_tokenizer.max_length), n_q
  )
  _, texts = dataset.read_texts(workdir, "test")
  encoder = store.load_encoder(workdir, mesh)
  encode_s = efficiency.text_encode_s_per_query(encoder, mesh, texts[:n_q], batch_size)
  similarity = gen.decode.needs_embeddings
  rows = {}
  rows["avg"] = efficiency.avg_queries_per_s(
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
  if hybrid_setup is not None:
    # The same search re-ranking its beam: the generator's parameters do not change its cost.
    # With the generator's query head, no text tower runs (its head is fitted for these
    # parameters, so the timed program is the one a user of this generator runs).
    head = None
    if hybrid_setup.choice.query == "generator":
      head = query_head_fit.fit_query_head(gen, params, gmesh, workdir, c)
    rows["avg_hybrid"] = efficiency.avg_queries_per_s(
      gen,
      params,
      shardings,
      gmesh,
      with_hybrid_weight(c, hybrid_setup.choice.weight),
      inputs,
      sizes,
      query_emb=None if head is not None else test_emb["caption_emb"][:n_q],
      image_emb=test_emb["image_emb"],
      encode_s_per_query=encode_s,
      query_head=head,
    )
  rows["two_tower"] = efficiency.two_tower_queries_per_s(
    encoder,
    mesh,
    texts[:n_q],
    test_emb["caption_emb"][:n_q],
    sizes,
    k=top_k,
    batch_size=batch_size,
    encode_s_per_query=encode_s,
  )
  frontier = []
  ef_search = tuple(int(e) for e in config.evaluate.ann_ef_search)
  cap = int(config.evaluate.ann_max_items)
  ann_sizes = tuple(n for n in sizes if not cap or n <= cap)
  if ef_search and ann_sizes:
    frontier = efficiency.ann_queries_per_s(
      test_emb["image_emb"],
      test_emb["caption_emb"][:n_q],
      ann_sizes,
      k=top_k,
      batch_size=batch_size,
      m=int(config.evaluate.ann_m),
      ef_construction=int(config.evaluate.ann_ef_construction),
      ef_search=ef_search,
      encode_s_per_query=encode_s,
    )
    rows["two_tower_hnsw"] = efficiency.fastest_at_recall(
      frontier, float(config.evaluate.ann_target_recall)
    )
  for method, method_rows in rows.items():
    for r in method_rows:
      writer.write(method=method, split="efficiency", **r)
  measured = {
    method: tuple(results_lib.SpeedRow(**r) for r in method_rows if "queries_per_s" in r)
    for method, method_rows in rows.items()
  }
  return Efficiency(
    measured,
    tuple(results_lib.AnnPoint(**r) for r in frontier),
    report.crossover(measured["avg"], measured["two_tower"]),
  )


# --- 6. Write the record ---------------------------------------------------------------------


def run_meta(config: ml_collections.ConfigDict, test_emb: dict, started: float) -> results_lib.Meta:
  """How and where these results were made; `started`: the run's `time.time()` at start."""
  return results_lib.Meta(
    config_hash=fingerprint.config_hash(config),
    avg_jax=avg_jax.__version__,
    jax=jax.__version__,
    backend=jax.default_backend(),
    devices=jax.device_count(),
    machine=f"{platform.machine()} {os.cpu_count()} cpus",
    test_images=int(len(test_emb["image_ids"])),
    seconds=round(time.time() - started, 1),
  )


def write_results(workdir: str, results: results_lib.Results) -> None:
  """`metrics.json` (artifacts/results.py), `report.md` with its plots, then the folder's
  checksums; process 0 writes."""
  if processes.is_main():
    directory = paths.evaluate_dir(workdir)
    results_lib.write(workdir, results)
    report.write_report(results, directory)
    checksums.write(directory)
