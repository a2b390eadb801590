"""Two JAX processes x 4 fake devices (gloo collectives) reproduce one process x 8 devices:
the tokenizer, generative and learning-to-rank training, evaluation search and export."""

import json
import os
import shutil

import jax
import numpy as np

from avg_jax import cli, paths
from avg_jax import config as config_lib
from avg_jax.cloud import local_multiprocess
from avg_jax.training import generative
from helpers import PIPELINE_OVERRIDES, pipeline_args

# Small, well-separated embeddings: nearest-codeword choices are not near-ties, so the
# identifiers must agree exactly (the tiny dual encoder's embeddings are nearly constant).
TOKENIZER_OVERRIDES = ["tokenizer.steps=8", "tokenizer.batch_size=64",
                       "tokenizer.codebook_size=8", "tokenizer.num_levels=3",
                       "tokenizer.e_dim=8", "tokenizer.hidden_dims=(16,)",
                       "tokenizer.dropout=0.25", "tokenizer.checkpoint_every=4"]


def _write_embeddings(workdir, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(6, dim)) * 3
  next_id = 0
  for split, n in (("train", 96), ("val", 16), ("test", 24)):
    image_ids = np.arange(next_id, next_id + n)
    next_id += n
    emb = (centers[rng.integers(0, 6, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    captions = np.repeat(emb, 5, axis=0) + 0.5 * rng.normal(size=(5 * n, dim))
    os.makedirs(paths.embed_dir(workdir), exist_ok=True)
    np.savez(paths.embeddings_file(workdir, split), image_ids=image_ids, image_emb=emb,
             caption_image_ids=np.repeat(image_ids, 5), caption_emb=captions.astype(np.float32))


def test_tokenizer_two_processes_match_one(repo_root, tmp_path):
  config = ["--config", str(repo_root / "configs/smoke.py:tiny"),
            *[f"--config.{o}" for o in TOKENIZER_OVERRIDES]]
  for name in ("one", "two"):
    _write_embeddings(str(tmp_path / name))
  assert cli.main(["tokenize", "--workdir", str(tmp_path / "one"), *config]) == 0
  assert local_multiprocess.run(["tokenize", "--workdir", str(tmp_path / "two"), *config],
                                processes=2, devices=4) == 0
  one, two = (paths.tokenizer_dir(str(tmp_path / n), "avg") for n in ("one", "two"))
  a, b = np.load(os.path.join(one, "voken_table.npz")), np.load(os.path.join(two, "voken_table.npz"))
  for key in a.files:
    np.testing.assert_array_equal(b[key], a[key], err_msg=key)
  np.testing.assert_allclose(np.load(os.path.join(two, "codebook.npy")),
                             np.load(os.path.join(one, "codebook.npy")), atol=1e-5)


def _params(repo_root, workdir, stage):
  config = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"), PIPELINE_OVERRIDES)
  return jax.device_get(generative.final_params(config, str(workdir), "avg", stage)[2])


def test_training_evaluation_and_export_two_processes_match_one(repo_root, tiny_workdir,
                                                                pipeline_workdir, tmp_path):
  workdir = tmp_path / "mp"
  shutil.copytree(tiny_workdir, workdir)  # same voken table as the single-process pipeline
  rc = local_multiprocess.run(["run", *pipeline_args(repo_root, workdir)], processes=2,
                              devices=4)
  assert rc == 0
  for stage in ("train", "rank"):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
                 _params(repo_root, workdir, stage), _params(repo_root, pipeline_workdir, stage))
  recall_one = json.loads((pipeline_workdir / "evaluate" / "metrics.json").read_text())["recall"]
  recall_two = json.loads((workdir / "evaluate" / "metrics.json").read_text())["recall"]
  assert recall_two == recall_one
  manifest = json.loads((workdir / "export" / "manifest.json").read_text())
  assert manifest["num_images"] == 40 and manifest["source_stage"] == "rank"
