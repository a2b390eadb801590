"""benchmarks/variants.py: variants in their own workdirs, the source untouched, paired
differences computed by hand."""

import json
import os

import numpy as np
import pytest
from helpers import load_script

from avg_jax.errors import UserError


def _tree(path):
  return sorted(
    (os.path.relpath(os.path.join(d, f), path), os.path.getmtime(os.path.join(d, f)))
    for d, _, files in os.walk(path)
    for f in files
  )


def test_rank_variants_share_their_generator_and_leave_the_source(
  repo_root, tiny_workdir, tmp_path, monkeypatch
):
  monkeypatch.chdir(repo_root)
  script = load_script(repo_root, "variants")
  before = _tree(tiny_workdir)
  out, keep = tmp_path / "v.json", tmp_path / "keep"
  assert (
    script.main(
      [
        "--workdir",
        str(tiny_workdir),
        "--config",
        "configs/smoke.py:tiny",
        "--out",
        str(out),
        "--keep",
        str(keep),
        "--stage",
        "rank",
        "--variant",
        "base=",
        "--variant",
        "w0=rank.rank_weight=0.0",
        "--variant",
        "id=decode.tie_break=image_id",
        "--splits",
        "val,test",
        "--seeds",
        "0",
      ]
    )
    == 0
  )
  assert _tree(tiny_workdir) == before
  # "id" differs from "base" in a search setting only: no workdir of its own.
  assert sorted(os.listdir(keep)) == ["base-0", "w0-0"]
  # The source's voken table fits base's config (no tokenizer override, the same seed): copied
  # (files and times), not fitted again.
  assert _tree(keep / "base-0" / "tokenizer") == _tree(tiny_workdir / "tokenizer")
  # w0 started from base's generator: identical train parameters, its own rank stage.
  base_train = _tree(keep / "base-0" / "train")
  assert [p for p, _ in _tree(keep / "w0-0" / "train")] == [p for p, _ in base_train]
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["base", "w0", "id"]
  for row in rows:
    for split in ("val", "test"):
      r = row[split]
      assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 100
      assert r["R@1"] <= r["code R@1"]
  d = rows[1]["val"]["vs_baseline"]["R@1"]
  assert d["diff"] == pytest.approx(rows[1]["val"]["R@1"] - rows[0]["val"]["R@1"])
  assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]


def test_paired_difference_and_keys_by_hand(repo_root):
  script = load_script(repo_root, "variants")
  base = np.array([[0, 3, 10, 1]])  # ranks: a hit at 1 for query 0 only
  variant = np.array([[1, 0, 10, 1], [0, 0, 10, 1]])
  # R@1 per query, seeds averaged: [0.5, 1, 0, 0] - [1, 0, 0, 0] -> mean +12.5 points.
  d = script.paired(variant, base, 1, np.random.default_rng(0))
  assert d["diff"] == pytest.approx(12.5)
  assert d["ci95"][0] <= 12.5 <= d["ci95"][1]
  key = script.training_key
  assert key(["decode.beam_size=20", "decode.tie_break=image_id"]) == ()
  assert key(["decode.tie_break=learned"]) == ("decode.tie_break=learned",)
  assert key(["rank.steps=5", "train.steps=9"], "train") == ("train.steps=9",)
  assert key(["rank.steps=5", "train.steps=9"], "rank") == ("rank.steps=5", "train.steps=9")


def test_errors(repo_root, tmp_path):
  script = load_script(repo_root, "variants")
  with pytest.raises(UserError, match="expected name=override"):
    script.parse_variant("no-equals-sign")
  args = ["--config", str(repo_root / "configs/smoke.py:tiny"), "--out", str(tmp_path / "o")]
  with pytest.raises(UserError, match="no prepared/"):
    script.main(["--workdir", str(tmp_path), *args, "--variant", "a="])
  with pytest.raises(UserError, match="must be distinct"):
    script.main(["--workdir", str(tmp_path), *args, "--variant", "a=", "--variant", "a="])
