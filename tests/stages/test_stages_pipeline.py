"""The whole pipeline on the tiny config: `run`, export -> load -> search parity, skipping
and redoing stages, and the search CLI's error cases."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import PIPELINE_OVERRIDES as OVERRIDES
from helpers import one_device_env
from helpers import pipeline_args as _args

from avg_jax import cli
from avg_jax import config as config_lib
from avg_jax.data import dataset
from avg_jax.evaluation import avg_eval
from avg_jax.inference.retriever import Retriever
from avg_jax.training import state as state_lib


@pytest.fixture
def pipeline(pipeline_workdir):
  return pipeline_workdir


def test_run_writes_results_report_and_export(pipeline):
  results = json.loads((pipeline / "evaluate" / "metrics.json").read_text())
  assert set(results["recall"]) == {"transductive", "inductive"}
  for protocol, recall in results["recall"].items():
    assert set(recall) == {"two_tower", "avg", "avg_ltr"}
    for method, r in recall.items():
      assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
      if method != "two_tower":  # code level: a hit whenever the image is a hit
        assert r["R@1"] <= r["code R@1"] <= r["code R@5"] <= r["code R@10"] <= 100
    seen = results["saw_pseudo_queries"][protocol]
    assert seen["two_tower"] is False
    # The tiny avg_shapes data has 5 pseudo queries per indexed (val / test) image.
    expected = 5 * (40 + 40) if protocol == "transductive" else 0
    assert seen["avg"] == seen["avg_ltr"] == expected
  assert [row["num_items"] for row in results["efficiency"]["avg"]] == [40, 100]
  # The HNSW two-tower at the same sizes: one deployed row per N, the whole frontier beside.
  assert [row["num_items"] for row in results["efficiency"]["two_tower_hnsw"]] == [40, 100]
  assert {(r["num_items"], r["ef_search"]) for r in results["ann_frontier"]} == {
    (n, ef) for n in (40, 100) for ef in (16, 32, 64, 128, 256)
  }
  assert results["meta"]["config_hash"]
  report = (pipeline / "evaluate" / "report.md").read_text()
  assert "| avg_ltr |" in report and (pipeline / "evaluate" / "efficiency.png").exists()
  manifest = json.loads((pipeline / "export" / "manifest.json").read_text())
  assert manifest["source_stage"] == "rank" and manifest["num_images"] == 40


def test_export_search_equals_in_process_search(repo_root, pipeline):
  config = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"), OVERRIDES)
  gen, mesh, params, shardings = state_lib.final_params(config, str(pipeline), "avg", "rank")
  m = avg_eval.evaluate_recall(
    gen, params, shardings, mesh, config, str(pipeline), "test", max_queries=12
  )
  _, texts = dataset.read_texts(str(pipeline), "test")
  retriever = Retriever.load(str(pipeline / "export"))
  k = int(config.decode.top_k)
  ids, scores = retriever.search(texts[:12], k=k)
  np.testing.assert_array_equal(ids, m["_results"]["item_ids"][:, :k])
  np.testing.assert_allclose(scores, m["_results"]["scores"][:, :k], rtol=1e-5, atol=1e-5)
  assert all(retriever.file_name(i).startswith("test/") for i in ids[:, 0])


def test_decode_voken_logits_only_reaches_evaluation_and_export(repo_root, pipeline, tmp_path):
  # With the key set, evaluation and the exported Retriever both score over EOS + voken rows
  # only: higher (less negative) scores than the full-vocabulary ones, and equal to each other.
  from avg_jax.stages import export as export_stage

  workdir = tmp_path / "w"
  shutil.copytree(pipeline, workdir)
  # The rank stage's candidates come from the search, so its parameters were made with the
  # key off: the generative ones, which do not depend on it, are exported instead.
  shutil.rmtree(workdir / "rank")
  spec = str(repo_root / "configs/smoke.py:tiny")
  config = config_lib.load_config(spec, list(OVERRIDES) + ["decode.voken_logits_only=true"])
  export_stage.run(config, str(workdir))
  manifest = json.loads((workdir / "export" / "manifest.json").read_text())
  assert manifest["decode"]["voken_logits_only"] is True
  gen, mesh, params, shardings = state_lib.final_params(config, str(workdir), "avg", "train")
  restricted = avg_eval.evaluate_recall(
    gen, params, shardings, mesh, config, str(workdir), "test", max_queries=6
  )
  full = avg_eval.evaluate_recall(
    gen,
    params,
    shardings,
    mesh,
    config_lib.load_config(spec, OVERRIDES),
    str(workdir),
    "test",
    max_queries=6,
  )
  assert np.all(restricted["_results"]["scores"][:, 0] > full["_results"]["scores"][:, 0])
  _, texts = dataset.read_texts(str(workdir), "test")
  k = int(config.decode.top_k)
  ids, scores = Retriever.load(str(workdir / "export")).search(texts[:6], k=k)
  np.testing.assert_array_equal(ids, restricted["_results"]["item_ids"][:, :k])
  np.testing.assert_allclose(scores, restricted["_results"]["scores"][:, :k], rtol=1e-5, atol=1e-5)


def _search(repo_root, *args, stdin=None):
  return subprocess.run(
    [sys.executable, "-m", "avg_jax", "search", *args],
    cwd=repo_root,
    input=stdin,
    capture_output=True,
    timeout=300,
    env=one_device_env(),
  )


# Runs `avg_jax.cli.main(["search", ...])` once per call in one process: a process of its own
# for each would import jax and load the model again (~5 s of CPU each). argv[1] is the
# separator of the calls that follow it; the calls' arguments are this process's own argv, so
# bytes that are not UTF-8 arrive as the shell hands them to `avg-jax`, and the one call that
# reads queries from stdin reads the real stdin. Each call's exit code and what it wrote to
# the file descriptors 1 and 2 (anything printed there, a traceback included; an exception
# escaping main prints its traceback there too) are printed as one JSON list.
_SEARCH_CALLS = r"""
import json, os, sys, tempfile, traceback
from avg_jax import cli

separator, calls = sys.argv[1], [[]]
for arg in sys.argv[2:]:
  if arg == separator:
    calls.append([])
  else:
    calls[-1].append(arg)


def run(args):
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    try:
      code = cli.main(["search", *args])
    except SystemExit as e:  # argparse's errors: the process would exit with this code
      code = e.code
    except BaseException:  # the process would print this traceback and exit 1
      traceback.print_exc()
      code = None
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
    out.seek(0)
    err.seek(0)
    return {"code": code, "stdout": out.read().decode(), "stderr": err.read().decode()}


print(json.dumps([run(call) for call in calls]))
"""


def _search_calls(repo_root, *calls, stdin=b""):
  """[{"code", "stdout", "stderr"}] of `avg-jax search` with each argument list of `calls`
  (str or bytes), in one process (`_SEARCH_CALLS`)."""
  separator = "--next-search-call--"
  argv = [a for call in calls for a in (separator, *call)][1:]
  proc = subprocess.run(
    [sys.executable, "-c", _SEARCH_CALLS, separator, *argv],
    cwd=repo_root,
    input=stdin,
    capture_output=True,
    timeout=300,
    env=one_device_env(),
  )
  assert proc.returncode == 0, proc.stderr.decode()
  results = json.loads(proc.stdout.decode().strip().splitlines()[-1])
  assert len(results) == len(calls)
  return results


def test_search_cli(repo_root, pipeline):
  model = str(pipeline / "export")
  # The installed entry point, queries from stdin (the blank line skipped), JSON out.
  ok = _search(
    repo_root, "--model", model, "--k", "3", "--json", stdin=b"a blue square\n\na cross\n"
  )
  assert ok.returncode == 0, ok.stderr
  out = [json.loads(line) for line in ok.stdout.decode().strip().splitlines()]
  assert [o["query"] for o in out] == ["a blue square", "a cross"]
  assert all(len(o["results"]) == 3 for o in out)
  # The text output and the error cases: `cli.main` (what the entry point runs) in one other
  # process, each call's exit code and output its own (`_SEARCH_CALLS`). Two queries with the
  # same k as above: the same search program, from the one-device compilation cache.
  text, *errors = _search_calls(
    repo_root,
    ["--model", model, "--k", "3", "a red circle", "a cross"],
    ["--model", model, ""],
    ["--model", model, "x" * 1001],
    ["--model", model, "--k", "0", "a"],
    ["--model", str(pipeline / "nope"), "a"],  # refused before loading the model
    ["--model", model],  # queries from stdin
    # The same bytes as a command-line argument: the same one-line error (was a TypeError).
    ["--model", model, b"\xff\xfe"],
    stdin=b"fine\n\xff\xfe\n",
  )
  assert text["code"] == 0 and text["stdout"].count("query: ") == 2, text
  lines = text["stdout"].splitlines()
  assert [lines[0], lines[4]] == ["query: a red circle", "query: a cross"] and len(lines) == 8
  # Each result line names the image file (and its score and id), not a bare id.
  first = lines[1]
  assert first.startswith("    1. test/") and ".png  score -" in first and "  image " in first
  messages = [
    "avg-jax: error: query 0: empty",
    "query 0: 1001 characters, the limit is 1000",
    "k must be in [1, 40], got 0",
    "not an avg-jax serving checkpoint",
    "query 1: not valid UTF-8",
    "",  # the argv bytes: the whole message is checked below
  ]
  assert len(errors) == len(messages)
  for result, message in zip(errors, messages):
    assert result["code"] == 2, result
    assert message in result["stderr"] and "Traceback" not in result["stderr"], result
  assert errors[-1]["stderr"].strip() == "avg-jax: error: query 0: not valid UTF-8 (byte 0)"


def test_rerun_skips_done_stages_and_redoes_damaged_ones(repo_root, pipeline, capsys):
  capsys.readouterr()
  assert cli.main(["run", *_args(repo_root, pipeline)]) == 0
  out = capsys.readouterr().out
  for line in (
    "prepared is complete",
    "train [avg, transductive]: finished",
    "rank [avg, transductive]: finished",
    "evaluate is complete",
    "export is complete",
  ):
    assert line in out, line
  # Damage: delete the export, garble the results, truncate the train stage's final params.
  shutil.rmtree(pipeline / "export")
  (pipeline / "evaluate" / "metrics.json").write_text("{not json")
  for root, _, files in os.walk(pipeline / "train" / "transductive" / "avg" / "params"):
    for f in files:
      if os.path.getsize(os.path.join(root, f)) > 100:
        open(os.path.join(root, f), "wb").close()
  assert cli.main(["run", *_args(repo_root, pipeline)]) == 0
  out = capsys.readouterr().out
  assert "train [avg, transductive]: finished" not in out  # damaged params: rewritten
  assert "export: wrote" in out and "evaluate is complete" not in out
  json.loads((pipeline / "evaluate" / "metrics.json").read_text())
  Retriever.load(str(pipeline / "export"))
