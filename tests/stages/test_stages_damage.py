"""Damaged stage outputs met by a later stage: one line naming the file and the stage to
rerun, exit 2; rerunning that stage repairs them (never "kept"). Bytes changed in place (the
size kept) are caught by the checksums recorded as each file was written."""

import logging
import os
import shutil

import numpy as np
import pytest
from helpers import flip_bytes, largest_file

from avg_jax import cli
from avg_jax.artifacts import checksums, io, paths, voken_tables

CHANGED = "does not match its checksum (changed since it was written)"


@pytest.fixture
def workdir(tiny_workdir, tmp_path):
  target = tmp_path / "w"
  shutil.copytree(tiny_workdir, target)
  return target


def _run(repo_root, workdir, stage, capsys) -> tuple[int, str, list[str]]:
  """`(exit status, stdout, stderr lines)` of `avg-jax STAGE` on the tiny config."""
  capsys.readouterr()
  rc = cli.main(
    [stage, "--config", str(repo_root / "configs" / "smoke.py:tiny"), "--workdir", str(workdir)]
  )
  captured = capsys.readouterr()
  return rc, captured.out, captured.err.strip().splitlines()


def _stage(repo_root, workdir, stage, capsys) -> tuple[int, list[str]]:
  rc, _, err = _run(repo_root, workdir, stage, capsys)
  return rc, err


def test_deleted_voken_table_names_it_and_tokenize_repairs_it(repo_root, workdir, capsys):
  table = voken_tables.voken_table_file(str(workdir), "avg")
  os.remove(table)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {table} is missing; rerun `avg-jax tokenize` "
    f"with --config.tokenizer.scheme=avg"
  ]
  assert _stage(repo_root, workdir, "tokenize", capsys)[0] == 0
  assert set(voken_tables.load(str(workdir), "avg")[1]) == {"train", "val", "test"}


def test_truncated_voken_table_is_one_line(repo_root, workdir, capsys):
  table = voken_tables.voken_table_file(str(workdir), "avg")
  size = os.path.getsize(table)
  os.truncate(table, 1000)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {table} has 1000 bytes, {size} were written; "
    f"rerun `avg-jax tokenize` with --config.tokenizer.scheme=avg"
  ]


def test_truncated_train_array_record_names_it_and_prepare_repairs_it(repo_root, workdir, capsys):
  (path,) = [
    os.path.join(r, f)
    for r, _, files in os.walk(workdir / "prepared")
    for f in files
    if "train.array_record" in f
  ]
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {path} has {size // 2} bytes, {size} were "
    f"written (damaged); rerun `avg-jax prepare` (it rewrites it)"
  ]
  assert _stage(repo_root, workdir, "prepare", capsys)[0] == 0
  assert os.path.getsize(path) == size


def _array_record(workdir, split):
  (path,) = [
    os.path.join(r, f)
    for r, _, files in os.walk(workdir / "prepared")
    for f in files
    if f"{split}.array_record" in f
  ]
  return path


@pytest.mark.parametrize("which", ["train array_record", "text tokenizer"])
def test_flipped_prepared_file_is_named_and_prepare_redoes_it(repo_root, workdir, capsys, which):
  path = (
    _array_record(workdir, "train")
    if which == "train array_record"
    else paths.text_tokenizer_model(str(workdir))
  )
  written = io.file_sha256(path)
  flip_bytes(path, count=4)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {path} {CHANGED}; rerun `avg-jax prepare` (it rewrites it)"
  ]
  rc, out, _ = _run(repo_root, workdir, "prepare", capsys)
  assert rc == 0 and f"is incomplete (damaged: {path} {CHANGED}); preparing it again" in out
  assert "kept" not in out and io.file_sha256(path) == written


def test_flipped_embeddings_are_named_and_embed_redoes_them(repo_root, workdir, capsys, caplog):
  path = paths.embeddings_file(str(workdir), "test")
  before = np.load(path)["caption_emb"]
  flip_bytes(path, count=4)
  rc, err = _stage(repo_root, workdir, "tokenize", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {path} {CHANGED}; rerun `avg-jax embed` (it rewrites it)"
  ]
  assert _stage(repo_root, workdir, "embed", capsys)[0] == 0
  assert f"embed: {path} {CHANGED}; redoing it" in caplog.text
  assert checksums.check(paths.embed_dir(str(workdir)), os.path.basename(path)) == ""
  np.testing.assert_allclose(np.load(path)["caption_emb"], before, rtol=1e-5, atol=1e-6)


def test_embed_over_finished_embeddings_keeps_them_without_loading_the_encoder(
  repo_root, workdir, capsys, caplog, monkeypatch
):
  from avg_jax.encoders import store

  caplog.set_level(logging.INFO)
  kept = {n: io.file_sha256(p) for n, p in _embed_files(workdir).items()}

  def must_not_load(*args, **kwargs):
    raise AssertionError("embed loaded the encoder with nothing to embed")

  monkeypatch.setattr(store, "load_encoder", must_not_load)
  assert _stage(repo_root, workdir, "embed", capsys)[0] == 0
  assert "the encoder is not loaded" in caplog.text
  assert {n: io.file_sha256(p) for n, p in _embed_files(workdir).items()} == kept
  # One embedding file to redo: then it is loaded, and only the damaged split is redone.
  monkeypatch.undo()
  val = paths.embeddings_file(str(workdir), "val")
  before = np.load(val)["image_emb"]
  flip_bytes(val, count=4)
  caplog.clear()
  assert _stage(repo_root, workdir, "embed", capsys)[0] == 0
  assert "embed: encoder loaded" in caplog.text
  after = {n: io.file_sha256(p) for n, p in _embed_files(workdir).items()}
  assert {n: h for n, h in after.items() if n != os.path.basename(val)} == {
    n: h for n, h in kept.items() if n != os.path.basename(val)
  }
  np.testing.assert_allclose(np.load(val)["image_emb"], before, rtol=1e-5, atol=1e-6)


def test_flipped_encoder_is_named_and_embed_builds_it_again(
  repo_root, workdir, capsys, caplog, monkeypatch
):
  from avg_jax.encoders import store

  params_dir, _ = store.encoder_files(str(workdir))
  flip_bytes(largest_file(params_dir), count=4)

  class Rebuilt(Exception):
    pass

  def build_encoder(*args, **kwargs):  # the rebuild itself is the embed stage's own test
    raise Rebuilt

  monkeypatch.setattr(store, "build_encoder", build_encoder)
  with pytest.raises(Rebuilt):
    _stage(repo_root, workdir, "embed", capsys)
  assert "does not match its checksum" in caplog.text
  assert "building the encoder again" in caplog.text


def _embed_files(workdir) -> dict:
  folder = paths.embed_dir(str(workdir))
  return {
    name: os.path.join(folder, name)
    for name in sorted(os.listdir(folder))
    if name.startswith("embeddings_")
  }


def test_flipped_codebook_is_caught_and_tokenize_redoes_it(repo_root, workdir, capsys, caplog):
  path = os.path.join(paths.tokenizer_dir(str(workdir), "avg"), voken_tables.CODEBOOK)
  written = io.file_sha256(path)
  flip_bytes(path, count=4)  # 4 values' bytes: still a valid .npy (it used to train on)
  rc, err = _stage(repo_root, workdir, "train", capsys)
  assert rc == 2 and err == [
    f"avg-jax: error: {path} {CHANGED}; rerun `avg-jax tokenize` with --config.tokenizer.scheme=avg"
  ]
  rc, out, _ = _run(repo_root, workdir, "tokenize", capsys)
  assert rc == 0 and "kept" not in out
  assert f"has a damaged output ({path} {CHANGED}); redoing it" in caplog.text
  assert io.file_sha256(path) == written


def test_flipped_evaluation_results_are_redone(pipeline_workdir, tmp_path):
  """evaluate's own check of its folder (a damaged one is redone, never "kept")."""
  from avg_jax.stages import evaluate

  directory = tmp_path / "evaluate"
  shutil.copytree(pipeline_workdir / "evaluate", directory)
  assert evaluate._results_load(str(directory)) == ""
  flip_bytes(str(directory / evaluate.RESULTS), count=4)
  assert evaluate._results_load(str(directory)) == f"{directory / evaluate.RESULTS} {CHANGED}"
