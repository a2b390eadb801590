"""`avg-jax evaluate` with avg_hybrid, and an avg_hybrid export, on the tiny pipeline."""

import json
import os
import shutil

import numpy as np
import pytest

from avg_jax import cli
from avg_jax import config as config_lib
from avg_jax.artifacts import checksums, embeddings
from avg_jax.artifacts import results as results_lib
from avg_jax.data import dataset
from avg_jax.errors import UserError
from avg_jax.evaluation import avg_eval, hybrid
from avg_jax.inference.retriever import Retriever
from avg_jax.stages import evaluate, export
from avg_jax.training import state as state_lib

WEIGHTS = "(0.0, 4.0, 64.0)"


@pytest.fixture(scope="module")
def hybrid_workdir(repo_root, pipeline_workdir, tmp_path_factory):
  """The tiny pipeline's finished stages, evaluated again with two_tower, avg (whose search
  the efficiency rows time) and avg_hybrid, and exported with export.hybrid=true."""
  workdir = tmp_path_factory.mktemp("hybrid") / "w"
  shutil.copytree(pipeline_workdir, workdir, ignore=shutil.ignore_patterns("evaluate", "export"))
  args = [
    "--config",
    str(repo_root / "configs/smoke.py:tiny"),
    "--workdir",
    str(workdir),
    "--config.evaluate.methods=('two_tower', 'avg', 'avg_hybrid')",
    f"--config.evaluate.hybrid_weights={WEIGHTS}",
    "--config.evaluate.protocols=('transductive',)",
    # N = 40, the test split alone: the efficiency row reuses the test search's program.
    "--config.evaluate.efficiency_sizes=(40,)",
    "--config.export.hybrid=true",
    "--config.evaluate.ann_max_items=20",
  ]  # no HNSW row at N = 40
  assert cli.main(["evaluate", *args]) == 0
  assert cli.main(["export", *args]) == 0
  return workdir, args


def _config(repo_root, **decode):
  config = config_lib.load_config(
    str(repo_root / "configs/smoke.py:tiny"), ["evaluate.protocols=('transductive',)"]
  )
  return evaluate.with_hybrid_weight(config, decode.get("hybrid_weight"))


def test_weight_is_chosen_on_validation_and_test_uses_it(repo_root, hybrid_workdir):
  workdir, _ = hybrid_workdir
  results = json.loads((workdir / "evaluate" / "metrics.json").read_text())
  chosen = results["hybrid"]["transductive"]
  assert [row["weight"] for row in chosen["validation"]] == [0.0, 4.0, 64.0]
  best = max(row["R@1"] for row in chosen["validation"])
  assert chosen["weight"] == min(r["weight"] for r in chosen["validation"] if r["R@1"] == best)
  # The test recall is the device search with that weight, which is the host re-ranking of
  # the plain beam with it.
  config = _config(repo_root)
  gen, mesh, params, shardings = state_lib.final_params(config, str(workdir), "avg", "rank")
  plain = avg_eval.evaluate_recall(gen, params, shardings, mesh, config, str(workdir), "test")
  test = embeddings.load(str(workdir), "test")
  ids = plain["_results"]["item_ids"]
  sim = hybrid.candidate_similarities(
    ids, test["caption_emb"], test["image_ids"], test["image_emb"]
  )
  ranked = hybrid.rerank(ids, plain["_results"]["scores"], sim, chosen["weight"])
  r1 = 100 * np.mean(ranked[:, 0] == plain["_true_ids"])
  assert results["recall"]["transductive"]["avg_hybrid"]["R@1"] == pytest.approx(r1)
  assert "R@1" in results["vs_two_tower"]["transductive"]["avg_hybrid"]
  assert [r["num_items"] for r in results["efficiency"]["avg_hybrid"]] == [40]
  assert "two_tower_hnsw" not in results["efficiency"] and "ann_frontier" not in results
  assert (
    "avg_hybrid: fusion weight chosen on validation"
    in (workdir / "evaluate" / "report.md").read_text()
  )


def test_hybrid_export_serves_the_chosen_weight(repo_root, hybrid_workdir):
  workdir, _ = hybrid_workdir
  results = json.loads((workdir / "evaluate" / "metrics.json").read_text())
  weight = results["hybrid"]["transductive"]["weight"]
  manifest = json.loads((workdir / "export" / "manifest.json").read_text())
  assert manifest["decode"]["hybrid_weight"] == weight
  config = _config(repo_root, hybrid_weight=weight)
  gen, mesh, params, shardings = state_lib.final_params(config, str(workdir), "avg", "rank")
  m = avg_eval.evaluate_recall(
    gen, params, shardings, mesh, config, str(workdir), "test", max_queries=8
  )
  _, texts = dataset.read_texts(str(workdir), "test")
  # k as evaluate's (the largest recall K): the same beam, so the same candidates to re-rank
  # (a search for fewer results runs fewer beams and may find other candidates).
  k = m["_results"]["item_ids"].shape[1]
  ids, _ = Retriever.load(str(workdir / "export")).search(texts[:8], k=k)
  np.testing.assert_array_equal(ids, m["_results"]["item_ids"])
  # A weight given at load time overrides the export's: a huge weight ranks by similarity.
  strong, _ = Retriever.load(str(workdir / "export"), hybrid_weight=1e6).search(texts[:8], k=5)
  test = embeddings.load(str(workdir), "test")
  q = test["caption_emb"][:8] / np.linalg.norm(test["caption_emb"][:8], axis=1, keepdims=True)
  img = test["image_emb"] / np.linalg.norm(test["image_emb"], axis=1, keepdims=True)
  row_of = {int(i): r for r, i in enumerate(test["image_ids"])}
  for query, ranked in enumerate(strong):
    sims = [float(q[query] @ img[row_of[int(i)]]) for i in ranked if i >= 0]
    assert sims == sorted(sims, reverse=True)


def test_export_hybrid_without_a_weight_is_a_clear_error(
  repo_root, pipeline_workdir, tmp_path, capsys
):
  workdir = tmp_path / "w"
  shutil.copytree(pipeline_workdir, workdir, ignore=shutil.ignore_patterns("evaluate", "export"))
  assert (
    cli.main(
      [
        "export",
        "--config",
        str(repo_root / "configs/smoke.py:tiny"),
        "--workdir",
        str(workdir),
        "--config.export.hybrid=true",
      ]
    )
    == 2
  )
  assert "export.hybrid: no fusion weight" in capsys.readouterr().err
  assert not (workdir / "export").exists()


def test_export_reads_the_weight_from_the_results_record(repo_root, tmp_path):
  """export.hybrid without decode.hybrid_weight: the weight evaluate chose for the config's
  protocol, read through the results record, which checks the file as it reads it."""
  config = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"), ["export.hybrid=true"])
  trials = (results_lib.WeightTrial(0.0, {"R@1": 1.0}), results_lib.WeightTrial(4.0, {"R@1": 2.0}))
  choice = results_lib.HybridChoice(4.0, "dual_encoder", trials)
  record = results_lib.Results(hybrid={str(config.protocol): choice})
  path = results_lib.write(str(tmp_path), record)
  checksums.write(os.path.dirname(path))
  assert export.hybrid_config(config, str(tmp_path)).decode.hybrid_weight == 4.0
  with open(path, "a") as f:
    f.write("\n")
  with pytest.raises(UserError, match=r"; rerun `avg-jax evaluate` \(it rewrites it\)$"):
    export.hybrid_config(config, str(tmp_path))


def test_retriever_hybrid_needs_the_dual_encoder(pipeline_workdir, tmp_path):
  from avg_jax.errors import UserError

  target = tmp_path / "export"
  shutil.copytree(pipeline_workdir / "export", target)
  # An export without the dual encoder (as the image_id tie-break writes it), whole.
  shutil.rmtree(target / "dual_encoder", ignore_errors=True)
  checksums.write(str(target))
  with pytest.raises(UserError, match="no dual encoder for avg_hybrid"):
    Retriever.load(str(target), hybrid_weight=4.0)


def test_hybrid_with_the_generators_query_head(repo_root, hybrid_workdir, tmp_path):
  """decode.hybrid_query="generator": evaluate fits the head, chooses the weight with its
  predicted validation embeddings and times no text tower; the export carries the head and
  the Retriever answers without the dual encoder's text tower, as evaluate's search does."""
  from avg_jax.training import query_head_fit

  source, args = hybrid_workdir
  workdir = tmp_path / "w"
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("evaluate", "export"))
  args = [a.replace(str(source), str(workdir)) for a in args]
  args = [a for a in args if not a.startswith("--config.evaluate.methods")] + [
    "--config.evaluate.methods=('avg', 'avg_hybrid')",
    "--config.decode.hybrid_query=generator",
  ]
  assert cli.main(["evaluate", *args]) == 0
  assert cli.main(["export", *args]) == 0
  results = json.loads((workdir / "evaluate" / "metrics.json").read_text())
  chosen = results["hybrid"]["transductive"]
  assert chosen["query"] == "generator" and len(chosen["validation"]) == 3
  assert [r["num_items"] for r in results["efficiency"]["avg_hybrid"]] == [40]
  assert (workdir / "export" / "query_head.npz").is_file()

  config = _config(repo_root, hybrid_weight=chosen["weight"])
  config.unlock()
  config.decode.hybrid_query = "generator"
  gen, mesh, params, shardings = state_lib.final_params(config, str(workdir), "avg", "rank")
  head = query_head_fit.fit_query_head(gen, params, mesh, str(workdir), config)
  m = avg_eval.evaluate_recall(
    gen, params, shardings, mesh, config, str(workdir), "test", max_queries=8, query_head=head
  )
  retriever = Retriever.load(str(workdir / "export"))
  assert retriever.dual_encoder is None and retriever.query_head is not None
  _, texts = dataset.read_texts(str(workdir), "test")
  ids, _ = retriever.search(texts[:8], k=m["_results"]["item_ids"].shape[1])
  np.testing.assert_array_equal(ids, m["_results"]["item_ids"])
  # Without the head file the export is refused with a one-line reason.
  (workdir / "export" / "query_head.npz").unlink()
  checksums.write(str(workdir / "export"))
  from avg_jax.errors import UserError

  with pytest.raises(UserError, match="no query_head.npz"):
    Retriever.load(str(workdir / "export"))
