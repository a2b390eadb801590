"""Sharded feature extraction: each (simulated) process writes only its shards, reruns skip
finished ones, damaged shards are redone with a warning, and the merged files equal a
one-shard run bit for bit."""

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import CompileCounter

from avg_jax import config as config_lib
from avg_jax import partitioning
from avg_jax.artifacts import embeddings, paths
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.encoders import clip, extract, preprocess, store
from avg_jax.errors import UserError
from avg_jax.stages import prepare

SPLITS = ("train", "val", "test")
# 60 / 8 / 8 images; 16 per shard: train 0-16, 16-32, 32-48, 48-60, val 0-8, test 0-8. Batches
# of 24 rows straddle the shard boundaries of a one-shard run, so rows meet other neighbours.
SMALL = [
  "data.num_train=60",
  "data.num_val=8",
  "data.num_test=8",
  "text_tokenizer.vocab_size=100",
  "encoder_train.embed_batch_size=24",
]
SHARDED = SMALL + ["encoder_train.embed_images_per_shard=16"]
TRAIN = [
  "train-000000000-000000016",
  "train-000000016-000000032",
  "train-000000032-000000048",
  "train-000000048-000000060",
]


def _config(repo_root, overrides):
  return config_lib.load_config(f"{repo_root}/configs/smoke.py:tiny", list(overrides))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, repo_root):
  """(prepared workdir, a randomly initialised encoder on all 8 devices, its mesh, the
  embeddings of a one-shard run)."""
  prepared = str(tmp_path_factory.mktemp("prepared"))
  config = _config(repo_root, SMALL)
  prepare.run(config, prepared)
  tokenizer = TextTokenizer.load(paths.text_tokenizer_model(prepared))
  cfg = clip.ClipConfig.from_config(
    config.encoder, vocab_size=tokenizer.vocab_size, eos_token_id=1, pad_token_id=0
  )
  mesh = partitioning.make_mesh({"data": -1})
  init = lambda rng: {"params": clip.init_fn(cfg)(rng)["params"]}
  variables, shardings = partitioning.sharded_init(init, mesh, jax.random.key(0))
  encoder = extract.DualEncoder(
    cfg,
    variables["params"],
    preprocess.PreprocessConfig.for_image_size(cfg.image_size),
    tokenizer,
    shardings["params"],
  )
  reference = _copy(prepared, tmp_path_factory.mktemp("one_shard"))
  assert extract.write_shards(encoder, reference, SPLITS, mesh, config, 0, 1) == {
    split: (1, 0, 1) for split in SPLITS
  }
  embeddings = {split: _merge(reference, split, config, cfg) for split in SPLITS}
  assert np.ptp(embeddings["train"]["image_emb"], axis=0).max() > 0  # rows differ
  return prepared, encoder, mesh, embeddings


def _copy(prepared, target):
  workdir = str(target / "w")
  shutil.copytree(paths.prepared_dir(prepared), paths.prepared_dir(workdir))
  return workdir


def _merge(workdir, split, config, cfg):
  extract.merge_shards(workdir, split, config, cfg.projection_dim)
  return embeddings.load(workdir, split)


def _assert_equal_to_reference(workdir, config, encoder, reference):
  for split in SPLITS:
    merged = _merge(workdir, split, config, encoder.cfg)
    for key in embeddings.KEYS:
      np.testing.assert_array_equal(merged[key], reference[split][key], err_msg=key)
  assert os.listdir(paths.embed_shards_dir(workdir)) == []  # merged shards are removed


def _count_shard_writes(monkeypatch):
  written = []
  write_shard = extract.write_shard

  def counting(encoder, images, captions, shard, *args):
    written.append(shard.name)
    return write_shard(encoder, images, captions, shard, *args)

  monkeypatch.setattr(extract, "write_shard", counting)
  return written


def test_local_encoder_keeps_the_parameters(setup, repo_root):
  _, encoder, _, _ = setup
  local, mesh = store.local_encoder(encoder, _config(repo_root, SMALL).mesh)
  assert mesh.devices.size == jax.local_device_count()
  jax.tree.map(
    np.testing.assert_array_equal, jax.device_get(local.params), jax.device_get(encoder.params)
  )


def test_two_processes_write_their_shards_and_match_one(setup, tmp_path, repo_root, capsys):
  prepared, encoder, mesh, reference = setup
  config, workdir = _config(repo_root, SHARDED), _copy(prepared, tmp_path)
  # Process 1 of 2: shards 1, 3 (train 16-32, 48-60) and 5 (test).
  counts = extract.write_shards(encoder, workdir, SPLITS, mesh, config, 1, 2)
  assert counts == {"train": (2, 0, 2), "val": (0, 0, 0), "test": (1, 0, 1)}
  assert sorted(os.listdir(paths.embed_shards_dir(workdir))) == [
    f"{n}.npz" for n in ("test-000000000-000000008", TRAIN[1], TRAIN[3])
  ]
  assert "embed train: wrote 2 of 2 shards (process 1 of 2)" in capsys.readouterr().out
  counts = extract.write_shards(encoder, workdir, SPLITS, mesh, config, 0, 2)
  assert counts == {"train": (2, 0, 2), "val": (1, 0, 1), "test": (0, 0, 0)}
  _assert_equal_to_reference(workdir, config, encoder, reference)


def test_a_rerun_skips_finished_shards_and_redoes_damaged_ones(
  setup, tmp_path, repo_root, capsys, monkeypatch
):
  prepared, encoder, mesh, reference = setup
  config, workdir = _config(repo_root, SHARDED), _copy(prepared, tmp_path)
  extract.write_shards(encoder, workdir, SPLITS, mesh, config, 0, 1)
  capsys.readouterr()
  written = _count_shard_writes(monkeypatch)
  extract.write_shards(encoder, workdir, SPLITS, mesh, config, 0, 1)
  assert written == []
  out = capsys.readouterr().out
  assert "embed train: 4 of 4 shards already done, skipped; wrote 0 of 4 shards" in out

  path = lambda name: os.path.join(paths.embed_shards_dir(workdir), f"{name}.npz")
  with open(path(TRAIN[0]), "r+b") as f:  # one flipped bit in caption_emb's rows, same size
    f.seek(os.path.getsize(path(TRAIN[0])) - 3000)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 1]))
  with open(path(TRAIN[2]), "r+b") as f:
    f.truncate(1000)
  np.savez(
    path("val-000000000-000000008"),
    image_ids=np.zeros(3, np.int64),  # wrong rows
    image_emb=np.zeros((3, 32), np.float32),
    caption_image_ids=np.zeros(15, np.int64),
    caption_emb=np.zeros((15, 32), np.float32),
  )
  extract.write_shards(encoder, workdir, SPLITS, mesh, config, 0, 1)
  assert sorted(written) == [TRAIN[0], TRAIN[2], "val-000000000-000000008"]
  out = capsys.readouterr().out
  assert (
    f"warning: embed shard {path(TRAIN[0])} cannot be read (BadZipFile: Bad CRC-32 for "
    "file 'caption_emb.npy'); writing it again"
  ) in out
  assert f"warning: embed shard {path(TRAIN[2])} cannot be read" in out
  assert (
    f"{path('val-000000000-000000008')} has image_ids int64[3], expected int64[8]; writing it again"
  ) in out
  assert "embed train: 2 of 4 shards already done, skipped; wrote 2 of 4 shards" in out
  _assert_equal_to_reference(workdir, config, encoder, reference)


def test_merging_names_a_missing_shard(setup, tmp_path, repo_root):
  prepared, encoder, mesh, _ = setup
  config, workdir = _config(repo_root, SHARDED), _copy(prepared, tmp_path)
  extract.write_shards(encoder, workdir, ["train"], mesh, config, 0, 2)  # process 1 never ran
  with pytest.raises(
    UserError,
    match=rf"embed shard .*{TRAIN[1]}\.npz is missing after every "
    "process finished",
  ):
    extract.merge_shards(workdir, "train", config, encoder.cfg.projection_dim)
  assert not os.path.exists(paths.embeddings_file(workdir, "train"))


def test_encoders_with_equal_configs_share_their_programs(setup):
  # Every `Retriever.load` of an export builds a new DualEncoder: its image and text programs
  # are the first one's, not compiled again.
  _, encoder, mesh, _ = setup
  images = np.zeros((3, encoder.cfg.image_size, encoder.cfg.image_size, 3), np.uint8)
  first = (encoder.encode_images(images, mesh, 8), encoder.encode_texts(["a red circle"], mesh))
  twin = dataclasses.replace(encoder, _jitted={})
  with CompileCounter() as compiles:
    again = (twin.encode_images(images, mesh, 8), twin.encode_texts(["a red circle"], mesh))
  assert compiles.count == 0
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
