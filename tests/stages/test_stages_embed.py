"""The `embed` stage on the tiny smoke config: trained and imported encoders, file contract,
idempotent reruns."""

import json
import os
import shutil

import numpy as np
import pytest

from avg_jax import config as config_lib
from avg_jax import partitioning
from avg_jax.artifacts import embeddings, paths
from avg_jax.data import dataset
from avg_jax.encoders import bpe, clip, extract, hf_import, store
from avg_jax.errors import UserError
from avg_jax.metrics import read_metrics
from avg_jax.stages import embed, prepare


def _mesh():
  return partitioning.make_mesh({"data": -1})


def _config(repo_root, *overrides):
  return config_lib.load_config(f"{repo_root}/configs/smoke.py:tiny", list(overrides))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, request):
  repo_root = request.config.rootpath
  workdir = str(tmp_path_factory.mktemp("embed_stage"))
  prepare.run(_config(repo_root), workdir)
  return workdir


def _copy_prepared(prepared, tmp_path):
  workdir = str(tmp_path / "work")
  shutil.copytree(paths.prepared_dir(prepared), paths.prepared_dir(workdir))
  return workdir


def _check_contract(workdir, dim):
  info = dataset.load_info(workdir)
  c = info["captions_per_image"]
  for split, counts in info["splits"].items():
    data = embeddings.load(workdir, split)
    n, m = counts["num_images"], counts["num_captions"]
    assert data["image_ids"].shape == (n,) and data["image_ids"].dtype == np.int64
    assert data["image_emb"].shape == (n, dim) and data["image_emb"].dtype == np.float32
    assert data["caption_image_ids"].shape == (m,) and data["caption_image_ids"].dtype == np.int64
    assert data["caption_emb"].shape == (m, dim) and data["caption_emb"].dtype == np.float32
    images = dataset.image_source(workdir, split)
    np.testing.assert_array_equal(data["image_ids"], [images[i]["image_id"] for i in range(n)])
    np.testing.assert_array_equal(data["caption_image_ids"], np.repeat(data["image_ids"], c))
    assert np.isfinite(data["image_emb"]).all() and np.isfinite(data["caption_emb"]).all()
    assert np.ptp(data["image_emb"], axis=0).max() > 0  # not one constant row
  leftovers = [f for f in os.listdir(paths.embed_dir(workdir)) if f.startswith(".tmp")]
  assert not leftovers


@pytest.mark.slow
def test_trained_encoder_stage(tiny_workdir, tmp_path, repo_root):
  # The tiny pipeline's embed stage (trained, checkpointed every 20 of 30 steps), on a copy.
  workdir = str(tmp_path / "work")
  shutil.copytree(tiny_workdir, workdir)
  config = _config(repo_root)
  _check_contract(workdir, config.encoder.projection_dim)
  assert not os.path.exists(os.path.join(paths.embed_dir(workdir), "checkpoints"))
  assert not os.path.exists(paths.embed_shards_dir(workdir))  # merged and removed
  embed_records = [r for r in read_metrics(workdir) if r["stage"] == "embed"]
  extraction = [r for r in embed_records if "shards" in r]
  assert {r["split"]: (r["shards"], r["shards_written"], r["processes"]) for r in extraction} == {
    s: (1, 1, 1) for s in ("train", "val", "test")
  }

  records = [r for r in embed_records if r.get("method") == "two_tower"]
  assert len(records) == 1 and records[0]["split"] == "test"
  assert all(0 <= records[0][k] <= 100 for k in ("R@1", "R@5", "R@10"))
  assert records[0]["R@1"] <= records[0]["R@5"] <= records[0]["R@10"]
  steps = [r["step"] for r in embed_records if "step" in r]
  assert steps and steps[-1] == config.encoder_train.steps

  # Rows are the features of the right images/captions: recompute a few with the saved encoder.
  encoder = store.load_encoder(workdir)
  test = embeddings.load(workdir, "test")
  captions = dataset.caption_source(workdir, "test")
  picks = [0, 7, len(captions) - 1]
  texts = [captions[i]["caption"] for i in picks]
  np.testing.assert_allclose(
    encoder.encode_texts(texts, _mesh()), test["caption_emb"][picks], rtol=1e-5, atol=1e-5
  )

  # Rerun: everything kept, nothing re-evaluated.
  files = {s: paths.embeddings_file(workdir, s) for s in ("train", "val", "test")}
  mtimes = {s: os.path.getmtime(f) for s, f in files.items()}
  embed.run(config, workdir)
  assert {s: os.path.getmtime(f) for s, f in files.items()} == mtimes
  assert len([r for r in read_metrics(workdir) if r.get("method") == "two_tower"]) == 1

  # A missing split file is recomputed, identical to the first time.
  before = embeddings.load(workdir, "val")
  os.remove(files["val"])
  embed.run(config, workdir)
  after = embeddings.load(workdir, "val")
  for key in embeddings.KEYS:
    np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-6)

  with pytest.raises(UserError, match=r"encoder_train\.learning_rate: 0\.002 -> 0\.5"):
    embed.run(_config(repo_root, "encoder_train.learning_rate=0.5"), workdir)


@pytest.mark.slow
def test_pretrained_encoder_stage(prepared, tmp_path, repo_root):
  workdir = _copy_prepared(prepared, tmp_path)
  clip_dir = str(repo_root / "tests" / "fixtures" / "clip_tiny_a")
  config = _config(repo_root, f"encoder.pretrained_path={clip_dir}")
  embed.run(config, workdir)
  cfg, params = hf_import.load_hf_clip(clip_dir)
  _check_contract(workdir, cfg.projection_dim)
  # Caption rows equal the imported model applied to our BPE tokens of those captions.
  tokenizer = bpe.ClipBpeTokenizer.load(clip_dir)
  test = embeddings.load(workdir, "test")
  captions = dataset.caption_source(workdir, "test")
  tokens = tokenizer.encode_batch([captions[i]["caption"] for i in range(3)], cfg.max_text_length)
  np.testing.assert_allclose(
    clip.encode_texts(params, cfg, tokens), test["caption_emb"][:3], rtol=1e-5, atol=1e-5
  )
  with open(os.path.join(paths.embed_dir(workdir), "encoder.json")) as f:
    meta = json.load(f)
  assert meta["tokenizer"]["kind"] == "clip_bpe" and meta["clip"]["text_pooling"] == "argmax"
  assert isinstance(store.load_encoder(workdir), extract.DualEncoder)


def test_missing_inputs_are_user_errors(tmp_path, repo_root):
  with pytest.raises(UserError, match="no prepared data"):
    embed.run(_config(repo_root), str(tmp_path))
  with pytest.raises(UserError, match="run `avg-jax embed` first"):
    embeddings.load(str(tmp_path), "test")
