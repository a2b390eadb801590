"""The Karpathy-split builder on a tiny fixture (PNG/JPEG files + JSON, see conftest.py)."""

import json
import logging
import os

import ml_collections
import numpy as np
import pytest

from avg_jax.data import builders
from avg_jax.data import dataset
from avg_jax.errors import UserError


def data_config(json_path, image_root, **kw):
  c = ml_collections.ConfigDict(dict(
      name="karpathy", karpathy_json=json_path, image_root=image_root, skip_bad_images=False,
      captions_per_image=5, image_size=16, image_encoding="png", jpeg_quality=95,
      num_train=0, num_val=0, num_test=0, generator_seed=0, examples_per_shard=1024))
  c.update(kw)
  return c


def read_split(builder_dir, split):
  records = dataset.records_in(builder_dir, split)
  decode = dataset.DecodeRecord()
  return [decode(records[i]) for i in range(len(records))]


def test_builds_splits_captions_and_resized_images(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path)
  result = builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  assert result.num_images == {"train": 2, "val": 1, "test": 2}
  assert result.skipped == []
  train = read_split(result.builder_dir, "train")
  # restval joins train; file order is kept; ids are the JSON's imgid.
  assert [e["image_id"] for e in train] == [10, 11]
  assert [e["file_name"] for e in train] == ["train2014/a.png", "val2014/b.jpg"]
  assert train[1]["captions"] == [f"a photo number {k} of b" for k in range(5)]  # first 5
  assert all(e["attributes"] == "" for e in train)
  for e in train:
    assert e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8
    # Shorter side -> 16, centre crop: only the red middle band remains (landscape and
    # portrait alike).
    assert (e["image"][..., 0] > 170).all() and (e["image"][..., 1] < 80).all(), e["file_name"]
  val = read_split(result.builder_dir, "val")
  assert [e["image_id"] for e in val] == [12] and val[0]["file_name"] == "c.png"
  np.testing.assert_array_equal(val[0]["image"], np.full((16, 16, 3), 200, np.uint8))
  test = read_split(result.builder_dir, "test")
  assert [e["image_id"] for e in test] == [13, 14]
  assert np.abs(test[0]["image"].astype(int) - 90).max() <= 2  # grey JPEG -> RGB


@pytest.mark.parametrize("kind,name", [("corrupt", "broken.jpg"), ("truncated", "cut.jpg")])
def test_corrupt_image_is_an_error_naming_it(karpathy_files, tmp_path, kind, name):
  json_path, image_root = karpathy_files(tmp_path, **{kind: True})
  with pytest.raises(UserError, match=rf"1 of 6 images are corrupt.*{name}.*skip_bad_images"):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def test_bad_images_are_skipped_with_a_warning_when_allowed(karpathy_files, tmp_path, caplog):
  json_path, image_root = karpathy_files(tmp_path, corrupt=True, truncated=True, missing=True)
  caplog.set_level(logging.WARNING)
  result = builders.build(data_config(json_path, image_root, skip_bad_images=True),
                          str(tmp_path / "out"))
  assert result.num_images == {"train": 2, "val": 1, "test": 2}
  skipped = sorted(os.path.basename(p) for p, _ in result.skipped)
  assert skipped == ["broken.jpg", "cut.jpg", "gone.png"]
  assert "3 of 8 images" in caplog.text and "skipped" in caplog.text
  assert [e["image_id"] for e in read_split(result.builder_dir, "test")] == [13, 14]


def test_missing_image_is_an_error_naming_its_path(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path, missing=True)
  with pytest.raises(UserError, match=r"1 of 6 images are missing: .*gone\.png"):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def test_too_few_captions(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path, short=True)
  with pytest.raises(UserError, match=r"few\.png.*captions_per_image"):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  result = builders.build(data_config(json_path, image_root, captions_per_image=2),
                          str(tmp_path / "out2"))
  assert result.num_images["train"] == 3
  assert read_split(result.builder_dir, "train")[2]["captions"] == [
      "a photo number 0 of few", "a photo number 1 of few"]


def test_malformed_json_names_the_file(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path)
  with open(json_path, "w") as f:
    f.write('{"images": [{"filename": "a.png",')
  with pytest.raises(UserError, match=r"dataset_test\.json: malformed JSON"):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


@pytest.mark.parametrize("key", ["sentences", "split", "filename"])
def test_missing_key_names_file_and_key(karpathy_files, tmp_path, key):
  json_path, image_root = karpathy_files(tmp_path)
  with open(json_path) as f:
    content = json.load(f)
  del content["images"][2][key]
  with open(json_path, "w") as f:
    json.dump(content, f)
  with pytest.raises(UserError, match=rf"dataset_test\.json: images\[2\] is missing key '{key}'"):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def test_other_bad_inputs(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path)
  with pytest.raises(UserError, match="missing key 'images'"):
    (tmp_path / "x.json").write_text('{"dataset": "x"}')
    builders.build(data_config(str(tmp_path / "x.json"), image_root), str(tmp_path / "o1"))
  with pytest.raises(UserError, match=r"not found: .*nope\.json.*data\.karpathy_json"):
    builders.build(data_config(str(tmp_path / "nope.json"), image_root), str(tmp_path / "o2"))
  with pytest.raises(UserError, match="data.karpathy_json is empty"):
    builders.build(data_config("", image_root), str(tmp_path / "o3"))
  content = json.loads(open(json_path).read())
  content["images"][0]["split"] = "holdout"
  (tmp_path / "y.json").write_text(json.dumps(content))
  with pytest.raises(UserError, match=r"y\.json: images\[0\] has unknown split 'holdout'"):
    builders.build(data_config(str(tmp_path / "y.json"), image_root), str(tmp_path / "o4"))
