"""What `evaluate` hands on: one typed record of its results, `<workdir>/evaluate/metrics.json`.

`export` reads avg_hybrid's chosen fusion weight from it, the report (evaluation/report.py)
its tables and plots, people the file itself. `write` and `read` are the only way in and out;
`read` checks the file against its checksum and the schema below, and says in one line naming
the file what is wrong (missing, malformed JSON, another schema version, a missing or unknown
key, a value of the wrong type).

The JSON object (indent 1), in this key order:

  schema_version: 1 (absent in files written before it: read as version 0, the same content)
  recall:      {protocol: {method: {"R@1", "R@5", "R@10" (image level), "code R@1", ...
               (code level, generators only)}}} in percent
  saw_pseudo_queries: {protocol: {method: int}} how many of the indexed images' pseudo
               queries training saw (0: none; two_tower: false; older results hold booleans)
  vs_two_tower: {protocol: {method: {"R@1": {"diff", "ci95": [lo, hi]}, ...}}} paired
               difference to the two-tower baseline over the same queries, points, 95 %
               bootstrap interval (only when two_tower was evaluated)
  efficiency:  {method: [{"num_items", "queries_per_s", ...}]} (avg, avg_hybrid, two_tower,
               two_tower_hnsw; see `SpeedRow`)
  codebook:    {tokenizer name: {"perplexity": [per level], "unused_share": [per level]}}
  collisions:  {tokenizer name: {split: rate}}
  hybrid:      {protocol: {"weight", "query", "validation": [{"weight", "R@1", ...}]}}
               (only with avg_hybrid; "query" is absent in version-0 files: dual_encoder)
  ann_frontier: [{"num_items", "ef_search", "queries_per_s", ...}] (only when HNSW was timed)
  crossover:   N from which AVG is faster than the two-tower, or null (with efficiency only)
  meta:        {"config_hash", "avg_jax", "jax", "backend", "devices", "machine",
               "test_images", "seconds"}

In memory `recall`, `saw_pseudo_queries` and `vs_two_tower` are one `MethodResult` per
(protocol, method): `Results.methods[protocol][method]`.
"""

import dataclasses
import json
import os
import re
import typing
from typing import Any

from avg_jax.artifacts import checksums, io, paths
from avg_jax.errors import UserError

SCHEMA_VERSION = 1
# Files written before `schema_version` was: the same content, read as this version.
LEGACY_VERSION = 0
REMEDY = "rerun `avg-jax evaluate` (it rewrites it)"

# Recall keys: image-level "R@K", code-level "code R@K".
_RECALL_KEY = re.compile(r"(code )?R@[0-9]+")


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """A method's Recall@K minus the two-tower's over the same test queries, in points, and its
  95 % bootstrap interval (`evaluation.recall.paired_difference`)."""

  diff: float
  ci95: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One method under one protocol, on the test split."""

  # "R@K" (image level) and, for generators, "code R@K" (code level), in percent.
  recall: dict[str, float]
  # How many of the indexed images' pseudo queries its training saw (0: none); False for
  # two_tower, which never sees them, and a boolean for every method in older results.
  saw_pseudo_queries: int | bool
  # Per "R@K": the paired difference to two_tower; None when two_tower was not evaluated.
  vs_two_tower: dict[str, PairedDifference] | None = None


@dataclasses.dataclass(frozen=True)
class WeightTrial:
  """One fusion weight avg_hybrid tried on the validation split, and its Recall@K there."""

  weight: float
  recall: dict[str, float]


@dataclasses.dataclass(frozen=True)
class HybridChoice:
  """avg_hybrid's fusion weight for one protocol, chosen on validation (best R@1, ties to the
  smaller weight), and the validation curve it was chosen from."""

  weight: float
  query: str  # the query embeddings: "dual_encoder", or "generator" (its query head)
  validation: tuple[WeightTrial, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpeedRow:
  """One measured index size of a method's efficiency curve (evaluation/efficiency.py). The
  optional fields are those its method has; fields are in the order they are written."""

  num_items: int
  ef_search: int | None = None  # two_tower_hnsw: the deployed HNSW point at this N
  queries_per_s: float
  trie_bytes: int | None = None  # avg, avg_hybrid
  embedding_bytes: int | None = None  # avg, avg_hybrid
  trie_build_s: float | None = None  # avg, avg_hybrid
  search_only_queries_per_s: float | None = None  # two_tower, two_tower_hnsw
  recall_at_k: float | None = None  # two_tower_hnsw, against exact search
  k: int | None = None  # two_tower_hnsw
  build_s: float | None = None  # two_tower_hnsw
  index_bytes: int | None = None  # two_tower_hnsw


@dataclasses.dataclass(frozen=True)
class AnnPoint:
  """One (N, ef_search) point of the two-tower HNSW frontier (`efficiency.ann_queries_per_s`)."""

  num_items: int
  ef_search: int
  queries_per_s: float  # text tower included
  search_only_queries_per_s: float
  recall_at_k: float  # against exact search
  k: int
  build_s: float
  index_bytes: int


@dataclasses.dataclass(frozen=True)
class CodebookUsage:
  """A tokenizer's codebook usage on the training split, per level."""

  perplexity: tuple[float, ...]
  unused_share: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Meta:
  """How and where the results were made."""

  config_hash: str
  avg_jax: str
  jax: str
  backend: str
  devices: int
  machine: str
  test_images: int
  seconds: float


@dataclasses.dataclass(frozen=True)
class Results:
  """Everything `evaluate` writes to `metrics.json` (the module docstring maps it to JSON)."""

  methods: dict[str, dict[str, MethodResult]] = dataclasses.field(default_factory=dict)
  efficiency: dict[str, tuple[SpeedRow, ...]] = dataclasses.field(default_factory=dict)
  codebook: dict[str, CodebookUsage] = dataclasses.field(default_factory=dict)
  collisions: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  hybrid: dict[str, HybridChoice] = dataclasses.field(default_factory=dict)
  ann_frontier: tuple[AnnPoint, ...] = ()
  crossover: float | None = None
  meta: Meta | None = None


# --- To JSON ---------------------------------------------------------------------------------


def _flat_json(record) -> dict:
  """A record of scalars as a JSON object: its fields in order, optional ones only when set."""
  return {
    f.name: getattr(record, f.name)
    for f in dataclasses.fields(record)
    if f.default is dataclasses.MISSING or getattr(record, f.name) is not None
  }


def to_json(results: Results) -> dict:
  """The JSON object of `results` (the module docstring), `schema_version` first."""
  out: dict[str, Any] = {
    "schema_version": SCHEMA_VERSION,
    "recall": {p: {m: dict(r.recall) for m, r in ms.items()} for p, ms in results.methods.items()},
    "saw_pseudo_queries": {
      p: {m: r.saw_pseudo_queries for m, r in ms.items()} for p, ms in results.methods.items()
    },
    "vs_two_tower": {},
    "efficiency": {m: [_flat_json(r) for r in rows] for m, rows in results.efficiency.items()},
    "codebook": {
      name: {"perplexity": list(u.perplexity), "unused_share": list(u.unused_share)}
      for name, u in results.codebook.items()
    },
    "collisions": {name: dict(rates) for name, rates in results.collisions.items()},
  }
  for protocol, ms in results.methods.items():
    versus = {
      m: {k: {"diff": d.diff, "ci95": list(d.ci95)} for k, d in r.vs_two_tower.items()}
      for m, r in ms.items()
      if r.vs_two_tower is not None
    }
    if versus:
      out["vs_two_tower"][protocol] = versus
  if results.hybrid:
    out["hybrid"] = {
      p: {
        "weight": h.weight,
        "query": h.query,
        "validation": [{"weight": t.weight, **t.recall} for t in h.validation],
      }
      for p, h in results.hybrid.items()
    }
  if results.ann_frontier:
    out["ann_frontier"] = [_flat_json(r) for r in results.ann_frontier]
  if results.efficiency or results.crossover is not None:
    out["crossover"] = results.crossover
  out["meta"] = None if results.meta is None else _flat_json(results.meta)
  return out


# --- From JSON -------------------------------------------------------------------------------


class _Invalid(Exception):
  """What is wrong with the JSON, and where (`from_json` names the file)."""


def _at(where: str) -> str:
  return where or "the top level"


def _object(value, where: str, required=None, optional=()) -> dict:
  """`value` checked to be a JSON object; with `required`, one with every key of it and
  others of `optional` only."""
  if not isinstance(value, dict):
    raise _Invalid(f"{_at(where)} is not a JSON object")
  if required is not None:
    for key in value:
      if key not in required and key not in optional:
        raise _Invalid(f"unknown key {key!r} in {_at(where)}")
    for key in required:
      if key not in value:
        raise _Invalid(f"missing key {key!r} in {_at(where)}")
  return value


def _list(value, where: str) -> list:
  if not isinstance(value, list):
    raise _Invalid(f"{where} is not a JSON list")
  return value


def _scalar(kind, value, where: str):
  """`value` checked to be of `kind` (int, float: any number, str, bool); NaN is a number."""
  if kind is float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
  elif kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
  else:
    ok = isinstance(value, kind)
  if not ok:
    name = "number" if kind is float else kind.__name__
    raise _Invalid(f"{where} is {json.dumps(value)[:40]}, not a {name}")
  return value


def _flat(cls, value, where: str):
  """A record of scalars (`SpeedRow`, `AnnPoint`, `Meta`) from its JSON object."""
  fields = dataclasses.fields(cls)
  obj = _object(
    value,
    where,
    required=[f.name for f in fields if f.default is dataclasses.MISSING],
    optional=[f.name for f in fields if f.default is not dataclasses.MISSING],
  )
  hints = typing.get_type_hints(cls)
  for name, v in obj.items():
    kinds = [k for k in (typing.get_args(hints[name]) or (hints[name],)) if k is not type(None)]
    _scalar(kinds[0], v, f"{where}.{name}")
  return cls(**obj)


def _recall(value, where: str) -> dict[str, float]:
  obj = _object(value, where)
  for key, v in obj.items():
    if not _RECALL_KEY.fullmatch(key):
      raise _Invalid(f"unknown key {key!r} in {where} (recall keys: 'R@K', 'code R@K')")
    _scalar(float, v, f"{where}.{key}")
  return dict(obj)


def _numbers(value, where: str) -> tuple[float, ...]:
  return tuple(_scalar(float, v, f"{where}[{i}]") for i, v in enumerate(_list(value, where)))


def _methods(top: dict) -> dict[str, dict[str, MethodResult]]:
  """`recall`, `saw_pseudo_queries` and `vs_two_tower` merged per (protocol, method): the
  last two must hold only protocols and methods of the first, the second all of them."""
  recall = _object(top["recall"], "recall")
  seen = _object(top["saw_pseudo_queries"], "saw_pseudo_queries")
  versus = _object(top["vs_two_tower"], "vs_two_tower")
  for name, other in (("saw_pseudo_queries", seen), ("vs_two_tower", versus)):
    for protocol in other:
      if protocol not in recall:
        raise _Invalid(f"unknown key {protocol!r} in {name} (a protocol without recall)")
  methods: dict[str, dict[str, Any]] = {}
  for protocol, by_method in recall.items():
    where = f"recall.{protocol}"
    by_method = _object(by_method, where)
    if protocol not in seen:
      raise _Invalid(f"missing key {protocol!r} in saw_pseudo_queries")
    seen_p = _object(seen[protocol], f"saw_pseudo_queries.{protocol}", required=list(by_method))
    versus_p = _object(versus.get(protocol, {}), f"vs_two_tower.{protocol}")
    for method in versus_p:
      if method not in by_method:
        raise _Invalid(f"unknown key {method!r} in vs_two_tower.{protocol} (no recall of it)")
    methods[protocol] = {}
    for method, r in by_method.items():
      count = seen_p[method]
      if not isinstance(count, int):  # bool is an int
        raise _Invalid(f"saw_pseudo_queries.{protocol}.{method} is not a count")
      diffs = None
      if method in versus_p:
        w = f"vs_two_tower.{protocol}.{method}"
        diffs = {}
        for key, d in _object(versus_p[method], w).items():
          if not _RECALL_KEY.fullmatch(key):
            raise _Invalid(f"unknown key {key!r} in {w}")
          d = _object(d, f"{w}.{key}", required=("diff", "ci95"))
          ci = _numbers(d["ci95"], f"{w}.{key}.ci95")
          if len(ci) != 2:
            raise _Invalid(f"{w}.{key}.ci95 has {len(ci)} numbers, not 2 (lo, hi)")
          diffs[key] = PairedDifference(_scalar(float, d["diff"], f"{w}.{key}.diff"), ci)
      methods[protocol][method] = MethodResult(_recall(r, f"{where}.{method}"), count, diffs)
  return methods


def _hybrid(value, version: int) -> dict[str, HybridChoice]:
  out = {}
  for protocol, h in _object(value, "hybrid").items():
    where = f"hybrid.{protocol}"
    # Version 0 files from before the generator's query head have no "query".
    legacy = version == LEGACY_VERSION
    h = _object(
      h,
      where,
      required=("weight", "validation") + (() if legacy else ("query",)),
      optional=("query",) if legacy else (),
    )
    trials = []
    for i, row in enumerate(_list(h["validation"], f"{where}.validation")):
      w = f"{where}.validation[{i}]"
      row = _object(row, w)
      if "weight" not in row:
        raise _Invalid(f"missing key 'weight' in {w}")
      weight = _scalar(float, row["weight"], f"{w}.weight")
      trials.append(
        WeightTrial(weight, _recall({k: v for k, v in row.items() if k != "weight"}, w))
      )
    out[protocol] = HybridChoice(
      _scalar(float, h["weight"], f"{where}.weight"),
      _scalar(str, h.get("query", "dual_encoder"), f"{where}.query"),
      tuple(trials),
    )
  return out


_REQUIRED = (
  "recall",
  "saw_pseudo_queries",
  "vs_two_tower",
  "efficiency",
  "codebook",
  "collisions",
  "meta",
)
_OPTIONAL = ("schema_version", "hybrid", "ann_frontier", "crossover")


def from_json(value: Any, source: str = "evaluation results") -> Results:
  """The `Results` of a JSON object as `to_json` writes it (or a version-0 file, which has no
  `schema_version`); a one-line `UserError` naming `source` when it does not fit."""
  try:
    return _from_json(value)
  except _Invalid as e:
    raise UserError(f"{source}: {e}; {REMEDY}") from None


def _from_json(value: Any) -> Results:
  top = _object(value, "")
  version = top.get("schema_version", LEGACY_VERSION)
  if type(version) is not int or version not in (LEGACY_VERSION, SCHEMA_VERSION):
    raise _Invalid(
      f"schema version {json.dumps(version)[:20]}, this avg-jax reads {SCHEMA_VERSION} (or "
      f"files without a version, written before it)"
    )
  _object(top, "", required=_REQUIRED, optional=_OPTIONAL)
  efficiency = {
    m: tuple(
      _flat(SpeedRow, r, f"efficiency.{m}[{i}]")
      for i, r in enumerate(_list(rows, f"efficiency.{m}"))
    )
    for m, rows in _object(top["efficiency"], "efficiency").items()
  }
  codebook = {}
  for name, usage in _object(top["codebook"], "codebook").items():
    where = f"codebook.{name}"
    usage = _object(usage, where, required=("perplexity", "unused_share"))
    codebook[name] = CodebookUsage(
      _numbers(usage["perplexity"], f"{where}.perplexity"),
      _numbers(usage["unused_share"], f"{where}.unused_share"),
    )
  collisions = {}
  for name, rates in _object(top["collisions"], "collisions").items():
    rates = _object(rates, f"collisions.{name}")
    collisions[name] = {s: _scalar(float, r, f"collisions.{name}.{s}") for s, r in rates.items()}
  crossover = top.get("crossover")
  return Results(
    methods=_methods(top),
    efficiency=efficiency,
    codebook=codebook,
    collisions=collisions,
    hybrid=_hybrid(top.get("hybrid", {}), version),
    ann_frontier=tuple(
      _flat(AnnPoint, r, f"ann_frontier[{i}]")
      for i, r in enumerate(_list(top.get("ann_frontier", []), "ann_frontier"))
    ),
    crossover=None if crossover is None else _scalar(float, crossover, "crossover"),
    meta=None if top["meta"] is None else _flat(Meta, top["meta"], "meta"),
  )


# --- Files -----------------------------------------------------------------------------------


def write(workdir: str, results: Results) -> str:
  """Writes `results` to `<workdir>/evaluate/metrics.json` atomically; -> its path. (The
  folder's checksums are the evaluate stage's, recorded once the report is written too.)"""
  path = paths.evaluate_results_file(workdir)
  io.write_json(path, to_json(results), default=float)
  return path


def read_file(path: str) -> Results:
  """The `Results` in the file at `path`; a one-line `UserError` naming it when it is missing,
  not JSON, or not of this schema."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} is missing; run `avg-jax evaluate`") from None
  except (OSError, ValueError) as e:
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise UserError(f"{path}: malformed JSON ({first}); {REMEDY}") from None
  return from_json(value, path)


def read(workdir: str) -> Results:
  """The results `evaluate` wrote in `workdir`, checked against the checksum recorded with
  them and against the schema (`read_file`)."""
  path = paths.evaluate_results_file(workdir)
  if os.path.isfile(path):
    problem = checksums.check(os.path.dirname(path), os.path.basename(path))
    if problem:
      raise UserError(f"{problem}; {REMEDY}")
  return read_file(path)
