"""A changed setting never serves an old result: the stage that reads it redoes its work (or,
for prepare / embed / tokenize, refuses with the changed keys named), and a stage that loads
an output made with other settings stops with one line naming them and the stage to rerun."""

import shutil

import jax
import numpy as np
import pytest
from helpers import PIPELINE_OVERRIDES

from avg_jax import cli
from avg_jax import config as config_lib
from avg_jax.training import state as state_lib


@pytest.fixture
def finished(pipeline_workdir, tmp_path):
  target = tmp_path / "w"
  shutil.copytree(pipeline_workdir, target)
  return target


def _run(repo_root, workdir, stage, capsys, *overrides) -> tuple[int, str, list[str]]:
  capsys.readouterr()
  rc = cli.main(
    [
      stage,
      "--config",
      str(repo_root / "configs" / "smoke.py:tiny"),
      "--workdir",
      str(workdir),
      *(f"--config.{o}" for o in overrides),
    ]
  )
  captured = capsys.readouterr()
  return rc, captured.out, captured.err.strip().splitlines()


def _params(repo_root, workdir, stage, *overrides):
  config = config_lib.load_config(
    str(repo_root / "configs" / "smoke.py:tiny"), [*PIPELINE_OVERRIDES, *overrides]
  )
  return jax.device_get(state_lib.final_params(config, str(workdir), "avg", stage)[2])


def test_a_tuning_change_retrains_and_nothing_built_on_the_old_model_is_kept(
  repo_root, finished, capsys
):
  old = _params(repo_root, finished, "train")
  rc, out, _ = _run(repo_root, finished, "train", capsys, "train.learning_rate=0.5")
  assert rc == 0 and "kept" not in out
  assert (
    f"train [avg, transductive]: removing the outputs of other inputs in "
    f"{finished}/train/transductive/avg (config.train.learning_rate: 0.001 -> 0.5)"
  ) in out
  new = _params(repo_root, finished, "train", "train.learning_rate=0.5")
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
  # The rank stage of the old settings loads parameters of other settings: refused.
  rc, _, err = _run(repo_root, finished, "rank", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {finished}/train/transductive/avg was made from other inputs than this "
    f"config's (config.train.learning_rate: 0.5 -> 0.001); rerun `avg-jax train`"
  ]
  # With the change, rank is made again from the new generator (it used to say "kept").
  rc, out, _ = _run(repo_root, finished, "rank", capsys, "train.learning_rate=0.5")
  assert rc == 0 and "kept" not in out and "removing the outputs of other inputs" in out


def test_a_changed_upstream_setting_is_refused_with_the_keys_named(
  repo_root, tiny_workdir, tmp_path, capsys
):
  workdir = tmp_path / "w"
  shutil.copytree(tiny_workdir, workdir)
  table = f"{workdir}/tokenizer/avg"
  # It used to train on the voken table of the old codebook size.
  rc, _, err = _run(repo_root, workdir, "train", capsys, "tokenizer.codebook_size=8")
  assert rc == 2 and err == [
    f"avg-jax: error: {table} was made from other inputs than this config's "
    f"(config.tokenizer.codebook_size: 16 -> 8); remove it and rerun `avg-jax tokenize` with "
    f"--config.tokenizer.scheme=avg, or run with the config it was made from"
  ]
  rc, _, err = _run(repo_root, workdir, "embed", capsys, "encoder_train.steps=31")
  assert rc == 2 and err == [
    f"avg-jax: error: {workdir}/embed was made from other inputs "
    f"(config.encoder_train.steps: 30 -> 31); remove it or use another --workdir"
  ]
  # A setting no result depends on changes nothing.
  rc, out, _ = _run(
    repo_root, workdir, "tokenize", capsys, "tokenizer.log_every=7", "train.log_every=3"
  )
  assert rc == 0 and "kept" in out
