"""Two JAX processes x 4 fake devices (gloo collectives) reproduce one process x 8 devices:
tokenizer, generative and learning-to-rank training, evaluation search and export."""

import json
import shutil

import jax
import numpy as np

from avg_jax import config as config_lib
from avg_jax.cloud import local_multiprocess
from avg_jax.training import generative
from helpers import PIPELINE_OVERRIDES, pipeline_args


def _params(repo_root, workdir, stage):
  config = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"), PIPELINE_OVERRIDES)
  return jax.device_get(generative.final_params(config, str(workdir), "avg", stage)[2])


def test_two_processes_reproduce_one(repo_root, tiny_workdir, pipeline_workdir, tmp_path):
  workdir = tmp_path / "mp"
  shutil.copytree(tiny_workdir, workdir)
  shutil.rmtree(workdir / "tokenizer")  # the tokenizer runs multi-process too
  rc = local_multiprocess.run(["run", *pipeline_args(repo_root, workdir)], processes=2,
                              devices=4)
  assert rc == 0

  one = np.load(pipeline_workdir / "tokenizer" / "avg" / "voken_table.npz")
  two = np.load(workdir / "tokenizer" / "avg" / "voken_table.npz")
  for key in one.files:
    np.testing.assert_array_equal(two[key], one[key], err_msg=key)
  np.testing.assert_allclose(np.load(workdir / "tokenizer" / "avg" / "codebook.npy"),
                             np.load(pipeline_workdir / "tokenizer" / "avg" / "codebook.npy"),
                             atol=1e-5)
  for stage in ("train", "rank"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 _params(repo_root, workdir, stage), _params(repo_root, pipeline_workdir, stage))
  recall_one = json.loads((pipeline_workdir / "evaluate" / "metrics.json").read_text())["recall"]
  recall_two = json.loads((workdir / "evaluate" / "metrics.json").read_text())["recall"]
  assert recall_two == recall_one
  manifest = json.loads((workdir / "export" / "manifest.json").read_text())
  assert manifest["num_images"] == 40
