"""Report writing and the efficiency crossover, on hand-made numbers."""

import dataclasses
import os
import pathlib

import pytest

from avg_jax.artifacts import results as results_lib
from avg_jax.evaluation import report


def _rows(pairs):
  """Efficiency rows as `metrics.json` holds them."""
  return [{"num_items": n, "queries_per_s": q} for n, q in pairs]


def _speed(pairs):
  return [results_lib.SpeedRow(num_items=n, queries_per_s=q) for n, q in pairs]


def _results(**parts) -> results_lib.Results:
  """The record of a `metrics.json` holding `parts`, the keys every file has empty otherwise
  and a count of 0 pseudo queries for each method `parts` gives none."""
  empty = ("recall", "vs_two_tower", "efficiency", "codebook", "collisions")
  value = {**{key: {} for key in empty}, "meta": None, **parts}
  seen = value.setdefault("saw_pseudo_queries", {})
  for protocol, methods in value["recall"].items():
    for method in methods:
      seen.setdefault(protocol, {}).setdefault(method, 0)
  return results_lib.from_json(value)


def test_crossover_interpolates_in_log_space():
  # Two-tower slows 10x per decade; AVG is flat at 100 q/s. Equal at N = 10^4 exactly.
  avg = _speed([(1000, 100.0), (100000, 100.0)])
  two = _speed([(1000, 1000.0), (100000, 10.0)])
  assert report.crossover(avg, two) == pytest.approx(10000.0, rel=1e-9)


def test_crossover_never_and_always():
  assert report.crossover(_speed([(10, 1.0), (100, 1.0)]), _speed([(10, 5.0), (100, 5.0)])) is None
  assert report.crossover(_speed([(10, 9.0)]), _speed([(10, 5.0)])) == 10.0
  assert report.crossover(_speed([(10, 9.0)]), _speed([(20, 5.0)])) is None


def test_crossover_is_where_avg_stays_faster():
  # The tiny run printed "AVG faster than two-tower from N ~ 100" with AVG faster at 100 and
  # slower at 1,000: only a crossing after which AVG never falls behind again counts.
  two = _speed([(100, 326.0), (1000, 408.5)])
  assert report.crossover(_speed([(100, 338.3), (1000, 321.8)]), two) is None
  two = _speed([(100, 100.0), (1000, 100.0), (10000, 10.0)])
  avg = _speed([(100, 200.0), (1000, 50.0), (10000, 50.0)])
  assert 1000 < report.crossover(avg, two) < 10000


def test_write_report_makes_markdown_and_plots(tmp_path):
  results = _results(
    meta={
      "config_hash": "09dab38760f229cd",
      "avg_jax": "0.1.0",
      "jax": "0.10.2",
      "backend": "cpu",
      "devices": 1,
      "machine": "x86_64 2 cpus",
      "test_images": 500,
      "seconds": 12.5,
    },
    recall={
      "transductive": {
        "two_tower": {"R@1": 50.0, "R@5": 80.0, "R@10": 90.0},
        "avg": {
          "R@1": 25.0,
          "R@5": 50.0,
          "R@10": 75.0,
          "code R@1": 30.0,
          "code R@5": 55.0,
          "code R@10": 80.0,
        },
      },
      "inductive": {
        "two_tower": {"R@1": 50.0, "R@5": 80.0, "R@10": 90.0},
        "avg": {
          "R@1": 20.0,
          "R@5": 45.0,
          "R@10": 70.0,
          "code R@1": 21.0,
          "code R@5": 46.0,
          "code R@10": 71.0,
        },
      },
    },
    saw_pseudo_queries={
      "transductive": {"two_tower": False, "avg": True},
      "inductive": {"two_tower": False, "avg": False},
    },
    vs_two_tower={"inductive": {"avg": {"R@1": {"diff": -2.0, "ci95": [-4.0, 0.5]}}}},
    efficiency={
      "avg": _rows([(1000, 100.0), (100000, 90.0)]),
      "two_tower": _rows([(1000, 1000.0), (100000, 10.0)]),
    },
    codebook={"avg": {"perplexity": [50.0, 40.0], "unused_share": [0.1, 0.2]}},
    collisions={"avg": {"train": 0.1, "test": 0.05}},
  )
  results = dataclasses.replace(
    results,
    crossover=report.crossover(results.efficiency["avg"], results.efficiency["two_tower"]),
  )
  path = report.write_report(results, str(tmp_path))
  text = pathlib.Path(path).read_text()
  assert "| avg | yes | 25.0 | 50.0 | 75.0 | 30.0 | 55.0 | 80.0 | – |" in text
  assert "| avg | no | 20.0 | 45.0 | 70.0 | 21.0 | 46.0 | 71.0 | -2.0 [-4.0, +0.5] |" in text
  assert "| two_tower | no | 50.0 | 80.0 | 90.0 | – | – | – | – |" in text
  assert text.index("### transductive") < text.index("### inductive")
  assert "| avg | 5.0% | 10.0% |" in text  # test, train columns sorted by name
  assert "| config_hash | 09dab38760f229cd |" in text
  for png in ("recall.png", "efficiency.png", "codebook.png", "collisions.png"):
    assert os.path.getsize(tmp_path / png) > 1000
  table = report.summary_table(results)
  assert "two_tower" in table and "AVG faster than two-tower from N ~ " in table
  lines = table.splitlines()
  assert lines[0] == (
    "protocol transductive (test; trained on the indexed images' pseudo queries: avg)"
  )
  assert lines[1].split()[:10] == [
    "method",
    "R@1",
    "R@5",
    "R@10",
    "code",
    "R@1",
    "code",
    "R@5",
    "code",
    "R@10",
  ]
  inductive_avg = [line for line in lines if line.startswith("avg ")][1]
  assert inductive_avg.split()[-3:] == ["-2.0", "[-4.0,", "+0.5]"]  # vs two-tower
  assert lines[3].split() == ["avg", "25.0", "50.0", "75.0", "30.0", "55.0", "80.0"]
  assert lines[2].split()[-3:] == ["–", "–", "–"]


# One N: the speed plot's log axis spans no range (matplotlib warned and widened it).
@pytest.mark.filterwarnings("error")
def test_efficiency_section_has_no_empty_recall_header(tmp_path):
  # report.md's efficiency block used to start with a "method R@1 R@5 R@10" header and no rows.
  results = _results(
    recall={"inductive": {"avg": {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}}},
    efficiency={"avg": _rows([(1000, 100.0)]), "two_tower": _rows([(1000, 50.0)])},
    crossover=1000.0,
  )
  text = pathlib.Path(report.write_report(results, str(tmp_path))).read_text()
  block = text.split("## Efficiency", 1)[1].split("```")[1]
  assert "R@1" not in block and "method" not in block
  assert block.strip().splitlines()[0].split() == ["N", "avg", "q/s", "two_tower", "q/s"]
  # The one-screen summary keeps both parts, recall first.
  summary = report.summary_table(results).splitlines()
  assert summary[0].startswith("protocol inductive") and summary[3] == ""
  assert summary[1].split()[:4] == ["method", "R@1", "R@5", "R@10"]
  assert report.summary_table(results_lib.Results()) == ""


def test_efficiency_columns_fit_long_method_names():
  # "two_tower q/stwo_tower_hnsw q/s": a 14-letter name overran the 16-wide columns.
  results = _results(
    efficiency={"two_tower": _rows([(1000, 50.0)]), "two_tower_hnsw": _rows([(1000, 3421.1)])}
  )
  header, row = report.summary_table(results).splitlines()[:2]
  assert header.split() == ["N", "two_tower", "q/s", "two_tower_hnsw", "q/s"]
  assert row.split() == ["1,000", "50.0", "3421.1"]
  assert len(header) == len(row)


def test_hybrid_and_hnsw_sections(tmp_path):
  frontier = [
    {
      "num_items": n,
      "ef_search": ef,
      "queries_per_s": q,
      "recall_at_k": r,
      "k": 10,
      "search_only_queries_per_s": 2 * q,
      "build_s": 1.5,
      "index_bytes": 3 * 2**20,
    }
    for n, ef, q, r in [
      (1000, 16, 900.0, 0.91),
      (1000, 64, 400.0, 0.99),
      (100000, 16, 500.0, 0.70),
      (100000, 64, 150.0, 0.96),
    ]
  ]
  results = _results(
    hybrid={
      "transductive": {
        "weight": 64.0,
        "query": "dual_encoder",
        "validation": [
          {"weight": 0.0, "R@1": 20.0, "R@5": 40.0, "R@10": 60.0},
          {"weight": 64.0, "R@1": 26.5, "R@5": 50.0, "R@10": 70.0},
        ],
      }
    },
    efficiency={
      "avg": _rows([(1000, 100.0), (100000, 90.0)]),
      "two_tower_hnsw": [frontier[1], frontier[3]],
    },
    ann_frontier=frontier,
  )
  text = pathlib.Path(report.write_report(results, str(tmp_path))).read_text()
  assert "### transductive (chosen: 64)" in text and "| 64 | 26.5 | 50.0 | 70.0 |" in text
  assert "| 100,000 | 64 | 150.0 | 300.0 | 0.960 | 1.5 | 3.0 |" in text
  assert os.path.getsize(tmp_path / "ann_frontier.png") > 1000


def test_metrics_that_do_not_apply_show_a_dash_never_nan(tmp_path):
  # A recall stored as NaN, a method without some
  # metric, an efficiency size a method skipped, a split a scheme has no collision rate for:
  # each is a dash ("–") in the summary and in report.md, never "nan" or a made-up 0.0%.
  results = _results(
    recall={
      "inductive": {
        "two_tower": {"R@1": 50.0, "R@5": float("nan"), "R@10": 90.0},
        "hkmeans": {"R@1": 10.0, "R@5": float("nan"), "R@10": 30.0, "code R@1": float("nan")},
      }
    },
    efficiency={
      "avg": _rows([(1000, 100.0), (10000, 90.0)]),
      "two_tower": _rows([(1000, 50.0)]),
    },
    crossover=None,
    collisions={"avg": {"train": 0.1, "test": 0.05}, "atomic": {"test": float("nan")}},
  )
  table = report.summary_table(results)
  text = pathlib.Path(report.write_report(results, str(tmp_path))).read_text()
  for out in (table, text):
    assert "nan" not in out.lower()
  lines = table.splitlines()
  assert lines[2].split() == ["two_tower", "50.0", "–", "90.0", "–", "–", "–"]
  assert lines[3].split() == ["hkmeans", "10.0", "–", "30.0", "–", "–", "–"]
  assert [line.split() for line in lines if line.strip().startswith("10,000")] == [
    ["10,000", "90.0", "–"]
  ]
  assert "| hkmeans | no | 10.0 | – | 30.0 | – | – | – | – |" in text
  assert "| atomic | – | – |" in text and "| avg | 5.0% | 10.0% |" in text


def test_report_says_what_training_saw():
  """Counts of pseudo queries, and a transductive run whose data had none says so (issue 28:
  the report once said "yes" for a protocol that trained on no pseudo query)."""
  recall = {"avg": {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0}}
  seen_some = _results(
    recall={"transductive": recall},
    saw_pseudo_queries={"transductive": {"avg": 817}},
  )
  assert "pseudo queries: avg (817))" in report.summary_table(seen_some)
  assert "| avg | yes (817) |" in "\n".join(report._markdown_recall(seen_some.methods))
  seen_none = _results(
    recall={"transductive": recall},
    saw_pseudo_queries={"transductive": {"avg": 0}},
  )
  table = report.summary_table(seen_none)
  assert "pseudo queries: none (the data has none: the same training as inductive)" in table
  assert "| avg | no |" in "\n".join(report._markdown_recall(seen_none.methods))
