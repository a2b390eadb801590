"""benchmarks/paper_dry_run.py at tiny size: configs/flickr30k.py through every stage with T5's
real tokenizer layout, measured per stage (the full-size run is the same code)."""

import json

import pytest
from helpers import load_script, use_one_device_subprocesses

from avg_jax.bench import dry_run
from avg_jax.data.text_tokenizer import TextTokenizer


@pytest.mark.slow
def test_tiny_dry_run_of_the_flickr30k_config(repo_root, tmp_path, capsys, monkeypatch):
  # The stage subprocesses see one CPU device: the dry run measures a user's host.
  use_one_device_subprocesses(monkeypatch)
  out = tmp_path / "r.json"
  assert (
    load_script(repo_root, "paper_dry_run").main(
      [
        "--size",
        "tiny",
        "--config",
        str(repo_root / "configs/flickr30k.py"),
        "--root",
        str(tmp_path),
        "--out",
        str(out),
        # Two steps per trained stage: the second is the steady step the rates are read from
        # (stage_runs._steady_rate skips the first, which compiles); a third only cost time.
        "--steps",
        "2",
        "2",
        "2",
        # No efficiency timing (queries/s against N indexed images): nothing here reads it;
        # tests/stages/test_stages_pipeline.py::test_run_writes_results_report_and_export
        # checks its rows on the tiny pipeline. The evaluate rate below is the test split's.
        "--override",
        "evaluate.efficiency_sizes=()",
      ]
    )
    == 0
  )
  results = json.loads(out.read_text())
  # The README's five input paths; besides them only step counts, logging and sizes.
  assert [o.split("=")[0] for o in results["input_overrides"]] == [
    "data.karpathy_json",
    "data.image_root",
    "encoder.pretrained_path",
    "t5.pretrained_path",
    "data.pseudo_queries",
  ]
  assert not any(o.startswith("text_tokenizer.") for o in results["dry_run_overrides"])
  # Feature extraction runs full batches: lowered to the smallest split (12 images).
  assert "encoder_train.embed_batch_size=12" in results["dry_run_overrides"]
  stages = {r["stage"]: r for r in results["stages"]}
  assert list(stages) == list(dry_run.stage_runs.STAGES)
  for r in stages.values():
    assert r["wall_s"] > 0 and r["peak_rss_mib"] > 50
  for stage in ("prepare", "embed", "tokenize", "train", "rank", "evaluate"):
    assert stages[stage]["rate"] > 0 and stages[stage]["epoch_hours_here"] > 0
  assert set(results["prepare_build_seconds"]) == {
    "assemble",
    "pseudo_queries",
    "text_tokenizer",
    "statistics",
  }
  # The text tokenizer is the T5 directory's (never trained); vokens follow its 32 128 rows.
  workdir, world = tmp_path / "workdir", tmp_path / "world"
  info = json.loads((workdir / "prepared" / "dataset_info.json").read_text())
  assert info["text_tokenizer"] == {
    "file": "text_tokenizer.model",
    "vocab_size": 32_000,
    "source": f"loaded from {world / 't5' / 'spiece.model'}",
  }
  manifest = json.loads((workdir / "export" / "manifest.json").read_text())
  assert manifest["vocab"]["text_vocab_size"] == 32_128
  assert manifest["t5"]["vocab_size"] == 32_128 + 1024 + manifest["vocab"]["disambiguation_size"]
  exported = TextTokenizer.load(str(workdir / "export" / "text_tokenizer.model"))
  assert exported.model_proto == (world / "t5" / "spiece.model").read_bytes()
  table = capsys.readouterr().out
  assert "peak RSS MiB" in table and "rank" in table
