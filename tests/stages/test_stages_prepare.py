"""`avg-jax prepare`: outputs and contract, idempotency, recovery, the CLI, no TensorFlow."""

import importlib.util
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
from helpers import flip_bytes

from avg_jax import cli
from avg_jax.artifacts import io, paths
from avg_jax.data import dataset
from avg_jax.data import prepared as prepared_lib
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.errors import UserError
from avg_jax.metrics import read_metrics
from avg_jax.stages import prepare

SMALL = ("data.num_train=60", "data.num_val=8", "data.num_test=8", "text_tokenizer.vocab_size=100")


def _snapshot(directory):
  """{relative path: (size, mtime_ns)} of every file under `directory`."""
  out = {}
  for folder, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


def test_prepared_data_follows_the_contract(prepared_workdir):
  info = dataset.load_info(prepared_workdir)
  assert info["dataset"] == "avg_shapes"
  assert info["captions_per_image"] == 5 and info["image_size"] == [32, 32]
  assert {s: (v["num_images"], v["num_captions"]) for s, v in info["splits"].items()} == {
    "train": (240, 1200),
    "val": (40, 200),
    "test": (40, 200),
  }
  assert len(info["config_hash"]) == 16
  assert set(info["attribute_frequencies"]) == {"objects", "shape", "color", "size", "position"}
  tokenizer = TextTokenizer.load(paths.text_tokenizer_model(prepared_workdir))
  assert tokenizer.vocab_size == info["text_tokenizer"]["vocab_size"] == 200

  images = dataset.image_source(prepared_workdir, "test")
  assert len(images) == 40
  first = images[0]
  assert set(first) == {"image_id", "image", "captions", "file_name", "attributes"}
  assert isinstance(first["image_id"], np.int64) and first["image_id"] == 280  # after train+val
  assert first["image"].shape == (32, 32, 3) and first["image"].dtype == np.uint8
  assert len(first["captions"]) == 5 and all(isinstance(c, str) for c in first["captions"])
  assert first["file_name"] == "test/000000.png"
  assert json.loads(first["attributes"])["objects"]
  ids = [int(images[i]["image_id"]) for i in range(len(images))]
  assert ids == list(range(280, 320))

  captions = dataset.caption_source(prepared_workdir, "test")
  assert len(captions) == 200
  for i in (0, 4, 5, 13, 199):
    element = captions[i]
    assert set(element) == {"image_id", "caption_index", "caption"}
    assert element["image_id"] == images[i // 5]["image_id"]
    assert element["caption_index"] == i % 5
    assert element["caption"] == images[i // 5]["captions"][i % 5]
  image_ids, texts = dataset.read_texts(prepared_workdir, "test")
  assert texts[13] == captions[13]["caption"] and image_ids[13] == captions[13]["image_id"]
  # Every split's ids are distinct from the others'.
  all_ids = [
    int(x)
    for s in ("train", "val", "test")
    for x in dataset.read_texts(prepared_workdir, s)[0][::5]
  ]
  assert len(set(all_ids)) == 320


def test_reading_errors_name_what_is_wrong(tmp_path, prepared_workdir):
  with pytest.raises(UserError, match=r"dataset_info.json not found.*avg-jax prepare"):
    dataset.load_info(str(tmp_path))
  with pytest.raises(UserError, match=r"unknown split 'dev'"):
    dataset.image_source(prepared_workdir, "dev")


def test_prepare_is_idempotent(tmp_path, tiny_config, capsys):
  config = tiny_config(*SMALL)
  workdir = str(tmp_path / "w")
  prepare.run(config, workdir)
  out = capsys.readouterr().out
  assert "prepared avg_shapes" in out and "train" in out and "tokens/cap" in out
  assert "attribute frequencies" in out
  before = _snapshot(paths.prepared_dir(workdir))
  prepare.run(config, workdir)
  assert "is complete for this data config" in capsys.readouterr().out
  assert _snapshot(paths.prepared_dir(workdir)) == before  # nothing rewritten
  records = [r for r in read_metrics(workdir) if r["stage"] == "prepare"]
  assert [r["reused"] for r in records] == [False] * 3 + [True] * 3
  assert {r["split"]: r["num_images"] for r in records} == {"train": 60, "val": 8, "test": 8}
  # A different data config in the same workdir is refused, naming the change.
  with pytest.raises(
    UserError, match=r"made from other inputs \(config.data.generator_seed: 0 -> 3\)"
  ):
    prepare.run(tiny_config(*SMALL, "data.generator_seed=3"), workdir)


def _array_record(prepared):
  info = json.load(open(os.path.join(prepared, "dataset_info.json")))
  return next(os.path.join(prepared, rel) for rel in info["files"] if "train.array_record" in rel)


def test_half_written_outputs_are_detected_and_redone(tmp_path, tiny_config, capsys):
  config = tiny_config(*SMALL)
  workdir = str(tmp_path / "w")
  prepared = paths.prepared_dir(workdir)
  # A temp dir left by a killed run (its pid is not alive) is removed.
  stale = tmp_path / "w" / f"{os.path.basename(io._temp_prefix(prepared))}x"
  stale = stale.with_name(stale.name.replace(f"-{os.getpid()}-", "-99999999-"))
  stale.mkdir(parents=True)
  (stale / "junk").write_text("half")
  foreign = tmp_path / "w" / "prepared.tmp-otherhost-123-abcd"  # another host's: kept
  foreign.mkdir()
  prepare.run(config, workdir)
  assert not stale.exists() and foreign.exists()
  out = capsys.readouterr().out
  assert "interrupted prepare" in out and "another host" in out
  good = _snapshot(prepared)

  # A truncated record file: detected by the manifest, prepared again.
  record_file = _array_record(prepared)
  with open(record_file, "r+b") as f:
    f.truncate(100)
  assert prepared_lib.check_prepared(prepared)[0] == "incomplete"
  prepare.run(config, workdir)
  assert "is incomplete" in capsys.readouterr().out
  assert prepared_lib.check_prepared(prepared)[0] == "complete"
  assert os.path.getsize(record_file) == good[os.path.relpath(record_file, prepared)][0]
  assert len(dataset.image_source(workdir, "train")) == 60

  # Bytes changed in place (the same size): readers refuse the file, prepare redoes it.
  written = io.file_sha256(record_file)
  flip_bytes(record_file, count=4)
  with pytest.raises(
    UserError,
    match=(
      rf"^{re.escape(record_file)} does not match its checksum \(changed since it was "
      rf"written\); rerun `avg-jax prepare` \(it rewrites it\)$"
    ),
  ):
    dataset.image_source(workdir, "train")
  assert prepared_lib.check_prepared(prepared)[0] == "incomplete"
  prepare.run(config, workdir)
  out = capsys.readouterr().out
  assert "is incomplete (damaged: " in out and "kept" not in out
  assert io.file_sha256(record_file) == written

  # No dataset_info.json (e.g. a copy that stopped half-way): prepared again.
  os.remove(os.path.join(prepared, "dataset_info.json"))
  prepare.run(config, workdir)
  assert "is incomplete" in capsys.readouterr().out
  assert dataset.load_info(workdir)["splits"]["val"]["num_images"] == 8


def _outputs(workdir) -> list[str]:
  """What a stage left in the workdir, less the stage locks (which stay, by design)."""
  return sorted(p for p in os.listdir(workdir) if p != ".locks")


def test_a_concurrent_prepare_that_finished_first_is_kept(
  tmp_path, tiny_config, monkeypatch, capsys
):
  workdir = str(tmp_path / "w")
  prepared = paths.prepared_dir(workdir)
  publish = io.publish_dir

  def another_process_finishes_first(tmp, path):
    shutil.copytree(tmp, path)  # the other process's complete output lands first
    return publish(tmp, path)

  monkeypatch.setattr(io, "publish_dir", another_process_finishes_first)
  prepare.run(tiny_config(*SMALL), workdir)
  assert "completed by another process" in capsys.readouterr().out
  # Our temp is gone, and so are the shards.
  assert _outputs(workdir) == ["metrics.jsonl", "prepared"]
  assert prepared_lib.check_prepared(prepared)[0] == "complete"


def test_a_failing_prepare_leaves_nothing_behind(tmp_path, tiny_config, monkeypatch, capsys):
  workdir = tmp_path / "w"

  def fail_after_writing(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(prepared_lib, "_make_tokenizer", fail_after_writing)  # after the records
  with pytest.raises(RuntimeError, match="disk full"):
    prepare.run(tiny_config(*SMALL), str(workdir))
  # No prepared/ and no temp dir; only the finished shards, kept for the next run.
  assert _outputs(workdir) == ["prepared.shards"]
  # A user error (too large a vocabulary) also leaves no output; the shards are reused.
  monkeypatch.undo()
  capsys.readouterr()
  with pytest.raises(UserError, match="text_tokenizer.vocab_size=100000"):
    prepare.run(tiny_config(*SMALL[:3], "text_tokenizer.vocab_size=100000"), str(workdir))
  assert [p for p in _outputs(workdir) if p != "metrics.jsonl"] == ["prepared.shards"]
  assert "prepare train: 1 of 1 shards already done, skipped" in capsys.readouterr().out
  prepare.run(tiny_config(*SMALL), str(workdir))
  assert "prepare train: 1 of 1 shards already done, skipped" in capsys.readouterr().out
  assert _outputs(workdir) == ["metrics.jsonl", "prepared"]


def test_karpathy_data_with_a_given_tokenizer(
  tmp_path, tiny_config, karpathy_files, prepared_workdir
):
  json_path, image_root = karpathy_files(tmp_path, corrupt=True)
  config = tiny_config(
    "data.name=karpathy",
    f"data.karpathy_json={json_path}",
    f"data.image_root={image_root}",
    "data.image_size=16",
    "data.skip_bad_images=true",
    f"text_tokenizer.model_path={paths.text_tokenizer_model(prepared_workdir)}",
  )
  workdir = str(tmp_path / "w")
  prepare.run(config, workdir)
  info = dataset.load_info(workdir)
  assert info["dataset"] == "karpathy" and info["image_size"] == [16, 16]
  assert {s: v["num_images"] for s, v in info["splits"].items()} == {
    "train": 2,
    "val": 1,
    "test": 2,
  }
  assert info["skipped_images"]["count"] == 1
  assert "broken.jpg" in info["skipped_images"]["first"][0]
  assert info["text_tokenizer"]["vocab_size"] == 200  # the given model, not a trained one
  with open(paths.text_tokenizer_model(workdir), "rb") as f:
    copied = f.read()
  with open(paths.text_tokenizer_model(prepared_workdir), "rb") as f:
    assert copied == f.read()
  assert dataset.image_source(workdir, "val")[0]["image"].shape == (16, 16, 3)


def test_every_skipped_image_is_listed_with_its_reason(
  tmp_path, tiny_config, karpathy_files, prepared_workdir, capsys
):
  # README: skipped images are listed in the prepared folder. dataset_info.json used to hold
  # only the first 20 of them; skipped_images.json has all, dataset_info.json the count.
  json_path, image_root = karpathy_files(tmp_path, missing=True)
  data = json.loads(open(json_path).read())
  for k in range(24):  # 24 more images that are not images
    with open(os.path.join(image_root, f"junk{k}.png"), "wb") as f:
      f.write(b"not a png")
    data["images"].append(
      {
        "filename": f"junk{k}.png",
        "imgid": 100 + k,
        "split": "train",
        "sentences": [{"raw": f"junk {k} {n}"} for n in range(5)],
      }
    )
  with open(json_path, "w") as f:
    json.dump(data, f)
  config = tiny_config(
    "data.name=karpathy",
    f"data.karpathy_json={json_path}",
    f"data.image_root={image_root}",
    "data.image_size=16",
    "data.skip_bad_images=true",
    f"text_tokenizer.model_path={paths.text_tokenizer_model(prepared_workdir)}",
  )
  workdir = str(tmp_path / "w")
  prepare.run(config, workdir)
  info = dataset.load_info(workdir)
  assert info["skipped_images"]["count"] == 25
  assert info["skipped_images"]["file"] == "skipped_images.json"
  listed = json.loads(open(os.path.join(paths.prepared_dir(workdir), "skipped_images.json")).read())
  assert len(listed) == 25
  assert {os.path.basename(e["path"]) for e in listed} == {"gone.png"} | {
    f"junk{k}.png" for k in range(24)
  }
  assert all(e["reason"] for e in listed)
  assert "skipped images: 25 (each with its reason in skipped_images.json)" in (
    capsys.readouterr().out
  )
  # Part of the folder's manifest: a deleted list makes the folder incomplete, not silently
  # kept without it.
  assert "skipped_images.json" in info["files"]


def test_cli_prepare_exits_0_without_tensorflow(tmp_path, monkeypatch, capsys):
  # TensorFlow must not be installed (requirements.txt leaves it out), so this run proves that
  # writing and reading the TFDS ArrayRecord data never needs it. (A None entry in sys.modules
  # cannot stand in: etils takes any entry as "TF is loaded" and then touches it.)
  assert importlib.util.find_spec("tensorflow") is None
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  workdir = str(tmp_path / "w")
  assert cli.main(["prepare", "--config", "configs/smoke.py:tiny", "--workdir", workdir]) == 0
  assert "prepared avg_shapes" in capsys.readouterr().out
  assert dataset.image_source(workdir, "train")[5]["image"].shape == (32, 32, 3)
  assert cli.main(["prepare", "--config", "configs/smoke.py:tiny", "--workdir", workdir]) == 0
  assert "kept" in capsys.readouterr().out
  # User errors exit 2 with one line naming the key.
  assert (
    cli.main(
      [
        "prepare",
        "--config",
        "configs/smoke.py:tiny",
        "--workdir",
        str(tmp_path / "k"),
        "--config.data.name=karpathy",
      ]
    )
    == 2
  )
  assert "data.karpathy_json is empty" in capsys.readouterr().err
  assert "tensorflow" not in sys.modules


def test_a_pretrained_t5_brings_its_tokenizer(tmp_path, tiny_config, prepared_workdir):
  # The paper path: no text_tokenizer.model_path, t5.pretrained_path's spiece.model is loaded
  # (never a trained one, which the pretrained model's text rows would not match).
  t5_dir = tmp_path / "t5"
  t5_dir.mkdir()
  given = open(paths.text_tokenizer_model(prepared_workdir), "rb").read()
  (t5_dir / "spiece.model").write_bytes(given)
  config = tiny_config(f"t5.pretrained_path={t5_dir}", "text_tokenizer.vocab_size=100000")
  workdir = str(tmp_path / "w")
  prepare.run(config, workdir)
  info = dataset.load_info(workdir)
  assert info["text_tokenizer"]["source"] == f"loaded from {t5_dir / 'spiece.model'}"
  assert open(paths.text_tokenizer_model(workdir), "rb").read() == given
  (t5_dir / "spiece.model").unlink()
  with pytest.raises(
    UserError,
    match=r"text_tokenizer.model_path \(empty: t5.pretrained_path's "
    r"spiece.model\) not readable: .*spiece.model",
  ):
    prepare.run(config, str(tmp_path / "w2"))


def test_metrics_time_process_0s_serial_steps(tmp_path, tiny_config):
  # What more processes do not shorten (assembling, pseudo queries, the text tokenizer and the
  # statistics pass over every record), on the records of the run that built the data only.
  workdir = str(tmp_path / "w")
  prepare.run(tiny_config(*SMALL), workdir)
  prepare.run(tiny_config(*SMALL), workdir)
  records = [r for r in read_metrics(workdir) if r["stage"] == "prepare"]
  built = [r["build_seconds"] for r in records if not r["reused"]]
  assert len(built) == 3 and all(b == built[0] for b in built)
  assert set(built[0]) == {"assemble", "pseudo_queries", "text_tokenizer", "statistics"}
  assert all(v >= 0 for v in built[0].values())
  assert not any("build_seconds" in r for r in records if r["reused"])
