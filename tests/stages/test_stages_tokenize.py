"""`avg-jax tokenize` on synthetic embeddings written in the embeddings-contract format."""

import json
import logging
import os

import numpy as np
import pytest

from avg_jax import cli
from avg_jax import config as config_lib
from avg_jax.artifacts import embeddings as embeddings_lib
from avg_jax.artifacts import fingerprint, paths, voken_tables
from avg_jax.errors import UserError
from avg_jax.metrics import read_metrics
from avg_jax.stages import tokenize
from avg_jax.tokenizer import fit as fit_lib
from avg_jax.tokenizer import ids

SPLIT_SIZES = (("train", 96), ("val", 16), ("test", 24))


def _write_embeddings(workdir, dim=12, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(6, dim)) * 3
  next_id = 1000
  for split, n in SPLIT_SIZES:
    image_ids = np.arange(next_id, next_id + n) * 3  # not 0..N-1: ids are opaque
    next_id += n
    emb = (centers[rng.integers(0, 6, n)] + rng.normal(size=(n, dim))).astype(np.float32)
    cap_ids = np.repeat(image_ids, 5)
    cap = (np.repeat(emb, 5, axis=0) + 0.5 * rng.normal(size=(5 * n, dim))).astype(np.float32)
    os.makedirs(paths.embed_dir(workdir), exist_ok=True)
    np.savez(
      paths.embeddings_file(workdir, split),
      image_ids=image_ids,
      image_emb=emb,
      caption_image_ids=cap_ids,
      caption_emb=cap,
    )
    embeddings_lib.record(workdir, paths.embeddings_file(workdir, split))  # as embed does


def _write_pseudo_queries(workdir, seed=1):
  """Embedded pseudo queries: 2 per val / test image, near their image."""
  rng = np.random.default_rng(seed)
  ids, emb = [], []
  for split in ("val", "test"):
    with np.load(paths.embeddings_file(workdir, split)) as f:
      ids.append(np.repeat(f["image_ids"], 2))
      emb.append(
        np.repeat(f["image_emb"], 2, axis=0)
        + 0.5 * rng.normal(size=(2 * len(f["image_ids"]), f["image_emb"].shape[1]))
      )
  np.savez(
    os.path.join(paths.embed_dir(workdir), "pseudo_queries.npz"),
    image_ids=np.concatenate(ids),
    query_emb=np.concatenate(emb).astype(np.float32),
  )
  embeddings_lib.record(workdir, os.path.join(paths.embed_dir(workdir), "pseudo_queries.npz"))


def _config(repo_root, scheme, mesh=("data=4", "model=2"), protocol="inductive", **extra):
  overrides = [
    f"protocol={protocol}",
    f"tokenizer.scheme={scheme}",
    "tokenizer.steps=6",
    "tokenizer.batch_size=64",
    "tokenizer.codebook_size=8",
    "tokenizer.num_levels=3",
    "tokenizer.e_dim=8",
    "tokenizer.hidden_dims=(16,)",
    "tokenizer.log_every=3",
    "tokenizer.checkpoint_every=3",
    "t5.vocab_size=50",
  ]
  overrides += [f"mesh.{m}" for m in mesh] + [f"tokenizer.{k}={v}" for k, v in extra.items()]
  return config_lib.load_config(str(repo_root / "configs" / "smoke.py") + ":tiny", overrides)


def _check_table(workdir, name):
  vocab, table, codebook = voken_tables.load(workdir, name)
  assert list(table) == [s for s, _ in SPLIT_SIZES]
  for split, n in SPLIT_SIZES:
    image_ids, codes = table[split]
    assert image_ids.dtype == np.int64 and codes.dtype == np.int32
    assert codes.shape == (n, vocab.id_length)
    with np.load(paths.embeddings_file(workdir, split)) as f:
      np.testing.assert_array_equal(image_ids, f["image_ids"])
    # Unique within each index (split), codes within each position's range.
    ids.check_identifiers(codes, vocab.position_sizes())
  assert codebook.dtype == np.float32 and codebook.shape == (vocab.num_level_tokens, 8)
  assert vocab.text_vocab_size == 50 and vocab.codebook_size == 8 and vocab.num_levels == 3
  return vocab, table, codebook


def test_avg_stage_on_data4_model2_mesh_is_valid_and_idempotent(
  tmp_path, repo_root, capsys, caplog
):
  workdir = str(tmp_path)
  _write_embeddings(workdir)
  config = _config(repo_root, "avg", shared_codebook=True, dropout=0.25)  # the reference's
  tokenize.run(config, workdir)
  vocab, table, codebook = _check_table(workdir, "avg")
  assert vocab.shared_codebook and codebook.shape[0] == 8
  printed = capsys.readouterr().out
  assert "collision" in printed and "train" in printed
  records = [r for r in read_metrics(workdir) if r["stage"] == "tokenize"]
  steps = [r["step"] for r in records if "step" in r]
  assert steps == [3, 6]
  split_records = {r["split"]: r for r in records if "collision_rate" in r}
  assert set(split_records) == {"train", "val", "test"}
  assert len(split_records["train"]["perplexity"]) == 3
  for r in split_records.values():
    assert r["method"] == "avg" and np.isfinite(r["recon_mse"]) and np.isfinite(r["align_mse"])
  ckpt_dir = os.path.join(paths.tokenizer_dir(workdir, "avg"), "checkpoints")
  assert sorted(os.listdir(ckpt_dir)) == ["3", "6"]

  # Same config again: nothing is recomputed or rewritten.
  table_file = voken_tables.voken_table_file(workdir, "avg")
  mtime = os.stat(table_file).st_mtime_ns
  capsys.readouterr()
  tokenize.run(config, workdir)
  assert os.stat(table_file).st_mtime_ns == mtime
  assert "tokenize [avg]: " in capsys.readouterr().out

  # A damaged output is redone (from the final checkpoint: no retraining).
  with open(table_file, "wb") as f:
    f.write(b"garbage")
  tokenize.run(config, workdir)
  _, redone, _ = _check_table(workdir, "avg")
  for split in table:
    np.testing.assert_array_equal(redone[split][1], table[split][1])

  # A crash after training (summary missing): the rerun resumes from the last checkpoint and
  # writes the same identifiers.
  os.remove(os.path.join(paths.tokenizer_dir(workdir, "avg"), voken_tables.SUMMARY))
  tokenize.run(config, workdir)
  _, again, codebook_again = _check_table(workdir, "avg")
  for split in table:
    np.testing.assert_array_equal(again[split][1], table[split][1])
  np.testing.assert_array_equal(codebook_again, codebook)

  # A damaged newest checkpoint: the rerun warns, resumes from the previous one (step 3) and
  # trains the last 3 steps again to the same identifiers.
  os.remove(os.path.join(paths.tokenizer_dir(workdir, "avg"), voken_tables.SUMMARY))
  for folder, _, files in os.walk(os.path.join(ckpt_dir, "6")):
    for name in files:
      with open(os.path.join(folder, name), "wb") as f:
        f.write(b"garbage")
  capsys.readouterr()
  with caplog.at_level(logging.WARNING):
    tokenize.run(config, workdir)
  assert any(os.path.join(ckpt_dir, "6") in r.getMessage() for r in caplog.records)
  assert "tokenize avg: resumed from step 3" in capsys.readouterr().out
  # Step 6 was trained (and logged) twice; metrics.jsonl keeps one record of it.
  steps = [r["step"] for r in read_metrics(workdir) if r["stage"] == "tokenize" and "step" in r]
  assert steps == [3, 6]
  _, after_damage, _ = _check_table(workdir, "avg")
  for split in table:
    np.testing.assert_array_equal(after_damage[split][1], table[split][1])

  # Another config into the same directory is refused with the differing key named.
  with pytest.raises(UserError, match="tokenizer.steps"):
    tokenize.run(_config(repo_root, "avg", shared_codebook=True, dropout=0.25, steps=7), workdir)


def test_a_failed_tokenize_does_not_block_the_corrected_rerun(tmp_path, repo_root):
  workdir = str(tmp_path)
  _write_embeddings(workdir)
  # A config error that shows only once the stage has started: aligning at the latent needs
  # e_dim equal to the embedding width (12).
  bad = _config(repo_root, "avg", mesh=("data=8",), align_position="latent")
  with pytest.raises(UserError, match="align_position"):
    tokenize.run(bad, workdir)
  with open(os.path.join(paths.tokenizer_dir(workdir, "avg"), fingerprint.RECORD)) as f:
    assert json.load(f)["complete"] is False  # claimed, never finished
  # The corrected config runs (it used to be refused: "made with a different config").
  tokenize.run(_config(repo_root, "avg", mesh=("data=8",)), workdir)
  _check_table(workdir, "avg")
  # Once finished, another config is refused, not silently redone.
  with pytest.raises(UserError, match="tokenizer.align_position: 'decoder' -> 'latent'"):
    tokenize.run(bad, workdir)


@pytest.mark.parametrize("scheme", ["rq", "hkmeans", "atomic", "random"])
def test_other_schemes_on_data8_mesh_write_valid_tables(tmp_path, repo_root, scheme):
  workdir = str(tmp_path)
  _write_embeddings(workdir)
  tokenize.run(_config(repo_root, scheme, mesh=("data=8",), shared_codebook=False), workdir)
  vocab, _, codebook = _check_table(workdir, scheme)
  assert not vocab.shared_codebook and codebook.shape[0] == 3 * 8  # one row per level token
  with open(os.path.join(paths.tokenizer_dir(workdir, scheme), voken_tables.SUMMARY)) as f:
    summary = json.load(f)
  assert summary["disambiguation_size"] == vocab.disambiguation_size
  for split, n in SPLIT_SIZES:
    assert summary["splits"][split]["images"] == n
    assert 0.0 <= summary["splits"][split]["collision_rate"] <= 1.0
  if scheme == "atomic":
    assert summary["collision_rate_all"] == 0.0 and vocab.disambiguation_size == 0


def test_table_printed_once_with_dashes_and_a_kept_table_is_one_line(tmp_path, repo_root, capsys):
  # evaluate re-enters tokenize for every method and protocol that uses a table: a finished
  # one answers with one line (once per process), not its statistics again. atomic has no
  # reconstruction or alignment error: the table shows a dash there, never nan.
  workdir = str(tmp_path)
  _write_embeddings(workdir)
  config = _config(repo_root, "atomic", mesh=("data=8",))
  tokenize.run(config, workdir)
  first = capsys.readouterr().out
  assert "recon MSE | align MSE" in first and "nan" not in first
  rows = [line for line in first.splitlines() if line.startswith(("train |", "test |"))]
  assert len(rows) == 2 and all(row.endswith("| – | –") for row in rows)
  for _ in range(3):
    tokenize.run(config, workdir)
  again = capsys.readouterr().out.splitlines()
  assert len(again) == 1 and again[0].startswith("tokenize [atomic]: ") and "kept" in again[0]


def test_cli_reports_missing_embeddings(tmp_path, repo_root, capsys):
  code = cli.main(
    [
      "tokenize",
      "--config",
      str(repo_root / "configs" / "smoke.py") + ":tiny",
      "--workdir",
      str(tmp_path),
    ]
  )
  assert code == 2
  assert "embeddings_train.npz not found" in capsys.readouterr().err


def test_bad_embeddings_and_scheme_are_user_errors(tmp_path, repo_root):
  workdir = str(tmp_path)
  os.makedirs(paths.embed_dir(workdir))
  np.savez(
    paths.embeddings_file(workdir, "train"),
    image_ids=np.arange(3),
    image_emb=np.zeros((3, 4), np.float32),
    caption_image_ids=np.array([0, 7]),
    caption_emb=np.zeros((2, 4), np.float32),
  )
  embeddings_lib.record(workdir, paths.embeddings_file(workdir, "train"))
  with pytest.raises(UserError, match="caption_image_ids"):
    tokenize.run(_config(repo_root, "random"), workdir)
  with pytest.raises(UserError, match="tokenizer.scheme"):
    tokenize.run(_config(repo_root, "semantic"), workdir)
  with pytest.raises(UserError, match="run `avg-jax tokenize`"):
    voken_tables.load(workdir, "avg")


def test_transductive_fit_uses_the_indexed_images_pseudo_queries(tmp_path, repo_root):
  workdir = str(tmp_path)
  _write_embeddings(workdir)
  config = _config(
    repo_root, "avg", mesh=("data=8",), protocol="transductive", fit_on_pseudo_queries=True
  )
  with pytest.raises(UserError, match="pseudo_queries.npz not found; run `avg-jax embed`"):
    tokenize.run(config, workdir)
  _write_pseudo_queries(workdir)
  tokenize.run(config, workdir)
  assert fit_lib.tokenizer_name(config, "avg", "transductive") == "avg+pseudo"
  _check_table(workdir, "avg+pseudo")
  with open(os.path.join(paths.tokenizer_dir(workdir, "avg+pseudo"), voken_tables.SUMMARY)) as f:
    assert json.load(f)["fit_on"] == "train pairs + 80 pseudo-query pairs of val/test images"
  # Without the option, and for schemes that fit nothing, both protocols share one table.
  off = _config(repo_root, "avg", protocol="transductive", fit_on_pseudo_queries=False)
  assert fit_lib.tokenizer_name(off, "avg", "transductive") == "avg"
  assert fit_lib.tokenizer_name(config, "atomic", "transductive") == "atomic"
  # The pairs: every training caption, then each pseudo query with its own image.
  embeddings = {s: embeddings_lib.load_checked(workdir, s) for s, _ in SPLIT_SIZES}
  with np.load(os.path.join(paths.embed_dir(workdir), "pseudo_queries.npz")) as f:
    pseudo = (f["image_ids"], f["query_emb"])
  fit = fit_lib.fit_pairs(embeddings, pseudo)
  train = embeddings["train"]
  assert len(fit["image_ids"]) == 96 + 16 + 24
  assert len(fit["caption_emb"]) == len(train["caption_emb"]) + 80
  np.testing.assert_array_equal(fit["image_ids"][fit["caption_image_index"][-80:]], pseudo[0])
  np.testing.assert_array_equal(fit["caption_emb"][-80:], pseudo[1])
