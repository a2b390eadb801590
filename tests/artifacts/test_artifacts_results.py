"""The evaluate stage's results record: `metrics.json` written and read back exactly, files of
before the schema version read as they are, and one-line errors naming the file."""

import json
import os

import pytest

from avg_jax.artifacts import checksums, paths
from avg_jax.artifacts import results as results_lib
from avg_jax.errors import UserError

# A metrics.json as evaluate wrote it before `schema_version` (the shape of a real run's,
# runs/main7/evaluate/metrics.json, cut to a few rows): read as version 0.
OLD = {
  "recall": {
    "transductive": {
      "two_tower": {"R@1": 14.68, "R@5": 49.92, "R@10": 73.28},
      "avg": {
        "R@1": 14.12,
        "R@5": 49.0,
        "R@10": 71.16,
        "code R@1": 14.12,
        "code R@5": 49.0,
        "code R@10": 71.16,
      },
      "avg_hybrid": {
        "R@1": 15.56,
        "R@5": 50.8,
        "R@10": 71.12,
        "code R@1": 14.12,
        "code R@5": 48.44,
        "code R@10": 71.12,
      },
    },
    "inductive": {
      "two_tower": {"R@1": 14.68, "R@5": 49.92, "R@10": 73.28},
      "avg": {
        "R@1": 12.0,
        "R@5": 41.2,
        "R@10": 60.0,
        "code R@1": 12.4,
        "code R@5": 41.6,
        "code R@10": 60.8,
      },
    },
  },
  "saw_pseudo_queries": {
    "transductive": {"two_tower": False, "avg": 817, "avg_hybrid": 817},
    "inductive": {"two_tower": False, "avg": 0},
  },
  "vs_two_tower": {
    "transductive": {
      "avg": {
        "R@1": {"diff": -0.56, "ci95": [-2.16, 1.12]},
        "R@5": {"diff": -0.92, "ci95": [-3.12, 1.16]},
        "R@10": {"diff": -2.12, "ci95": [-3.84, -0.4]},
      },
      "avg_hybrid": {"R@1": {"diff": 0.88, "ci95": [-0.4, 2.2]}},
    },
    "inductive": {"avg": {"R@1": {"diff": -2.68, "ci95": [-4.4, -1.0]}}},
  },
  "efficiency": {
    "avg": [
      {
        "num_items": 1000,
        "queries_per_s": 238.87974477259073,
        "trie_bytes": 38708,
        "embedding_bytes": 0,
        "trie_build_s": 0.0008455960014543962,
      }
    ],
    "avg_hybrid": [
      {
        "num_items": 1000,
        "queries_per_s": 135.85500602734362,
        "trie_bytes": 38708,
        "embedding_bytes": 512000,
        "trie_build_s": 0.0008147269982146099,
      }
    ],
    "two_tower": [
      {
        "num_items": 1000,
        "queries_per_s": 656.7208550673791,
        "search_only_queries_per_s": 2435.6925780812307,
      }
    ],
    "two_tower_hnsw": [
      {
        "num_items": 1000,
        "ef_search": 16,
        "queries_per_s": 887.7571710943248,
        "search_only_queries_per_s": 70037.7435603898,
        "recall_at_k": 0.9953125,
        "k": 10,
        "build_s": 0.12998098000025493,
        "index_bytes": 656090,
      }
    ],
  },
  "codebook": {"avg": {"perplexity": [46.8, 49.43, 42.73], "unused_share": [0.17, 0.06, 0.05]}},
  "collisions": {"avg": {"train": 0.028333333333333332, "val": 0.0, "test": 0.0}},
  "hybrid": {
    "transductive": {
      "weight": 64.0,
      "query": "dual_encoder",
      "validation": [
        {"weight": 0.0, "R@1": 23.44, "R@5": 69.84, "R@10": 84.72},
        {"weight": 64.0, "R@1": 26.96, "R@5": 73.44000000000001, "R@10": 84.72},
      ],
    }
  },
  "ann_frontier": [
    {
      "num_items": 1000,
      "ef_search": ef,
      "queries_per_s": q,
      "search_only_queries_per_s": 10 * q,
      "recall_at_k": r,
      "k": 10,
      "build_s": 0.12998098000025493,
      "index_bytes": 656090,
    }
    for ef, q, r in ((16, 887.7571710943248, 0.9953125), (32, 881.7860897228765, 1.0))
  ],
  "crossover": 112171.22415855131,
  "meta": {
    "config_hash": "09dab38760f229cd",
    "avg_jax": "0.1.0",
    "jax": "0.10.2",
    "backend": "cpu",
    "devices": 1,
    "machine": "x86_64 2 cpus",
    "test_images": 500,
    "seconds": 1747.3,
  },
}


def _record() -> results_lib.Results:
  """A record with every part set, booleans and counts mixed, one method without a paired
  difference."""
  R = results_lib
  return R.Results(
    methods={
      "transductive": {
        "two_tower": R.MethodResult({"R@1": 50.0, "R@5": 80.0}, False),
        "avg_hybrid": R.MethodResult(
          {"R@1": 52.5, "R@5": 81.0, "code R@1": 40.0, "code R@5": 70.0},
          40,
          {"R@1": R.PairedDifference(2.5, (-1.0, 6.0))},
        ),
      },
      "inductive": {"rq": R.MethodResult({"R@1": 20.0, "R@5": 45.0}, 0)},
    },
    efficiency={
      "avg": (
        R.SpeedRow(
          num_items=100, queries_per_s=12.5, trie_bytes=4, embedding_bytes=0, trie_build_s=0.1
        ),
      ),
      "two_tower": (R.SpeedRow(num_items=100, queries_per_s=3.0, search_only_queries_per_s=9.0),),
    },
    codebook={"avg": R.CodebookUsage((10.0, 9.5), (0.0, 0.25))},
    collisions={"avg": {"train": 0.1, "test": 0.0}},
    hybrid={
      "transductive": R.HybridChoice(
        4.0,
        "generator",
        (R.WeightTrial(0.0, {"R@1": 30.0}), R.WeightTrial(4.0, {"R@1": 31.0})),
      )
    },
    ann_frontier=(R.AnnPoint(100, 16, 20.0, 200.0, 0.99, 10, 0.5, 1024),),
    crossover=None,
    meta=R.Meta("abc", "0.1.0", "0.10.2", "cpu", 8, "x86_64 2 cpus", 40, 3.5),
  )


def _write_text(workdir, text: str) -> str:
  path = paths.evaluate_results_file(str(workdir))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return path


def _error(path: str) -> str:
  with pytest.raises(UserError) as e:
    results_lib.read_file(path)
  message = str(e.value)
  assert "\n" not in message and path in message
  return message


def test_round_trip_is_exact(tmp_path):
  record = _record()
  path = results_lib.write(str(tmp_path), record)
  assert path == str(tmp_path / "evaluate" / "metrics.json")
  checksums.write(paths.evaluate_dir(str(tmp_path)))
  assert results_lib.read(str(tmp_path)) == record
  assert results_lib.from_json(results_lib.to_json(record)) == record
  stored = json.loads(open(path).read())
  assert list(stored)[0] == "schema_version" and stored["schema_version"] == 1
  # The JSON people read: the per-method parts as three maps, as before the record.
  assert stored["saw_pseudo_queries"] == {
    "transductive": {"two_tower": False, "avg_hybrid": 40},
    "inductive": {"rq": 0},
  }
  assert stored["vs_two_tower"] == {
    "transductive": {"avg_hybrid": {"R@1": {"diff": 2.5, "ci95": [-1.0, 6.0]}}}
  }
  assert stored["efficiency"]["two_tower"] == [
    {"num_items": 100, "queries_per_s": 3.0, "search_only_queries_per_s": 9.0}
  ]
  assert stored["crossover"] is None  # efficiency measured, AVG never faster


def test_a_record_without_efficiency_has_no_crossover_key():
  stored = results_lib.to_json(results_lib.Results())
  assert "crossover" not in stored and "hybrid" not in stored and "ann_frontier" not in stored
  assert results_lib.from_json(stored) == results_lib.Results()


def test_a_file_of_before_the_schema_version_is_read(tmp_path):
  text = json.dumps(OLD, indent=1)
  record = results_lib.read_file(_write_text(tmp_path, text))
  assert record.methods["transductive"]["avg"].recall["code R@10"] == 71.16
  assert record.methods["transductive"]["avg"].saw_pseudo_queries == 817
  assert record.methods["transductive"]["two_tower"].saw_pseudo_queries is False
  assert record.methods["transductive"]["two_tower"].vs_two_tower is None
  assert record.methods["inductive"]["avg"].vs_two_tower["R@1"].ci95 == (-4.4, -1.0)
  assert record.hybrid["transductive"].weight == 64.0
  assert [t.weight for t in record.hybrid["transductive"].validation] == [0.0, 64.0]
  assert record.efficiency["two_tower_hnsw"][0].ef_search == 16
  assert record.efficiency["avg"][0].ef_search is None
  assert [p.ef_search for p in record.ann_frontier] == [16, 32]
  assert record.codebook["avg"].unused_share == (0.17, 0.06, 0.05)
  assert record.meta.config_hash == "09dab38760f229cd"
  # Written again, the file is the same but for the version in front.
  again = results_lib.to_json(record)
  assert again.pop("schema_version") == results_lib.SCHEMA_VERSION
  assert json.dumps(again, indent=1) == text


def test_an_old_hybrid_choice_without_its_query_kind_is_the_dual_encoders(tmp_path):
  old = json.loads(json.dumps(OLD))
  del old["hybrid"]["transductive"]["query"]
  record = results_lib.read_file(_write_text(tmp_path, json.dumps(old)))
  assert record.hybrid["transductive"].query == "dual_encoder"
  # A versioned file must say which.
  old["schema_version"] = results_lib.SCHEMA_VERSION
  message = _error(_write_text(tmp_path, json.dumps(old)))
  assert "missing key 'query' in hybrid.transductive" in message


def test_another_schema_version_is_refused(tmp_path):
  path = _write_text(tmp_path, json.dumps(dict(OLD, schema_version=7)))
  message = _error(path)
  assert "schema version 7, this avg-jax reads 1" in message
  assert message.endswith("rerun `avg-jax evaluate` (it rewrites it)")


def test_a_missing_file(tmp_path):
  path = paths.evaluate_results_file(str(tmp_path))
  assert _error(path) == f"{path} is missing; run `avg-jax evaluate`"


def test_malformed_json(tmp_path):
  message = _error(_write_text(tmp_path, '{"recall": {'))
  assert "malformed JSON" in message
  assert "not a JSON object" in _error(_write_text(tmp_path, "[1, 2]"))


@pytest.mark.parametrize(
  "change, expected",
  [
    (lambda v: v.update(notes="hi"), "unknown key 'notes' in the top level"),
    (lambda v: v.pop("meta"), "missing key 'meta' in the top level"),
    (
      lambda v: v["efficiency"]["avg"][0].update(speed=1.0),
      "unknown key 'speed' in efficiency.avg[0]",
    ),
    (
      lambda v: v["recall"]["inductive"]["avg"].update({"P@1": 3.0}),
      "unknown key 'P@1' in recall.inductive.avg",
    ),
    (
      lambda v: v["saw_pseudo_queries"]["inductive"].pop("avg"),
      "missing key 'avg' in saw_pseudo_queries.inductive",
    ),
    (lambda v: v["meta"].pop("seconds"), "missing key 'seconds' in meta"),
    (
      lambda v: v["hybrid"]["transductive"].update(weight="64"),
      'hybrid.transductive.weight is "64", not a number',
    ),
    (
      lambda v: v["vs_two_tower"]["inductive"].update(rq={}),
      "unknown key 'rq' in vs_two_tower.inductive",
    ),
  ],
)
def test_keys_and_values_that_do_not_fit_the_schema(tmp_path, change, expected):
  value = json.loads(json.dumps(OLD))
  change(value)
  message = _error(_write_text(tmp_path, json.dumps(value)))
  assert expected in message, message


def test_read_checks_the_recorded_checksum(tmp_path):
  path = results_lib.write(str(tmp_path), _record())
  checksums.write(os.path.dirname(path))
  with open(path, "a") as f:
    f.write(" ")
  with pytest.raises(UserError) as e:
    results_lib.read(str(tmp_path))
  assert str(e.value) == (
    f"{path} has {os.path.getsize(path)} bytes, {os.path.getsize(path) - 1} were written; "
    "rerun `avg-jax evaluate` (it rewrites it)"
  )
