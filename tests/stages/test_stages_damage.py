"""Damaged stage outputs met by a later stage: one line naming the file and the stage to
rerun, exit 2; rerunning that stage repairs them."""

import os
import shutil

import pytest

from avg_jax import cli
from avg_jax.artifacts import voken_tables


@pytest.fixture
def workdir(tiny_workdir, tmp_path):
  target = tmp_path / "w"
  shutil.copytree(tiny_workdir, target)
  return target


def _stage(repo_root, workdir, stage, capsys) -> tuple[int, list[str]]:
  capsys.readouterr()
  rc = cli.main([stage, "--config", str(repo_root / "configs" / "smoke.py:tiny"),
                 "--workdir", str(workdir)])
  return rc, capsys.readouterr().err.strip().splitlines()


def test_deleted_voken_table_names_it_and_tokenize_repairs_it(repo_root, workdir, capsys):
  table = voken_tables.voken_table_file(str(workdir), "avg")
  os.remove(table)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [f"avg-jax: error: {table} is missing; rerun `avg-jax tokenize` "
                             f"with --config.tokenizer.scheme=avg"]
  assert _stage(repo_root, workdir, "tokenize", capsys)[0] == 0
  assert set(voken_tables.load(str(workdir), "avg")[1]) == {"train", "val", "test"}


def test_truncated_voken_table_is_one_line(repo_root, workdir, capsys):
  table = voken_tables.voken_table_file(str(workdir), "avg")
  os.truncate(table, 1000)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [f"avg-jax: error: {table}: cannot read (BadZipFile: File is not "
                             f"a zip file); rerun `avg-jax tokenize` with "
                             f"--config.tokenizer.scheme=avg"]


def test_truncated_train_array_record_names_it_and_prepare_repairs_it(repo_root, workdir,
                                                                      capsys):
  (path,) = [os.path.join(r, f) for r, _, files in os.walk(workdir / "prepared")
             for f in files if "train.array_record" in f]
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [f"avg-jax: error: {path} has {size // 2} bytes, {size} were "
                             f"written (damaged); rerun `avg-jax prepare` (it rewrites it)"]
  assert _stage(repo_root, workdir, "prepare", capsys)[0] == 0
  assert os.path.getsize(path) == size
