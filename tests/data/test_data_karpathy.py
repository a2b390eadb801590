"""The Karpathy-split builder on a tiny fixture (PNG/JPEG files + JSON, see conftest.py)."""

import json
import logging
import os
import re
import warnings

import ml_collections
import numpy as np
import pytest
from PIL import Image

from avg_jax.data import builders, dataset
from avg_jax.errors import UserError


def data_config(json_path, image_root, **kw):
  c = ml_collections.ConfigDict(
    dict(
      name="karpathy",
      karpathy_json=json_path,
      image_root=image_root,
      skip_bad_images=False,
      captions_per_image=5,
      image_size=16,
      image_encoding="png",
      jpeg_quality=95,
      num_train=0,
      num_val=0,
      num_test=0,
      generator_seed=0,
      examples_per_shard=1024,
    )
  )
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


@pytest.mark.parametrize(
  "kind,name,reason",
  [
    (
      "corrupt",
      "broken.jpg",
      r"not an image in a format avg-jax reads \(PNG, JPEG, WebP, GIF, "
      r"BMP or SVG\)",
    ),
    ("truncated", "cut.jpg", r"cannot decode \(OSError: "),
  ],
)
def test_corrupt_image_is_an_error_naming_it(karpathy_files, tmp_path, kind, name, reason):
  json_path, image_root = karpathy_files(tmp_path, **{kind: True})
  with pytest.raises(
    UserError,
    match=rf"1 of 6 images cannot be used: .*{name}: {reason}.*"
    "skip_bad_images",
  ):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def test_bad_images_are_skipped_with_a_warning_when_allowed(karpathy_files, tmp_path, caplog):
  json_path, image_root = karpathy_files(tmp_path, corrupt=True, truncated=True, missing=True)
  caplog.set_level(logging.WARNING)
  result = builders.build(
    data_config(json_path, image_root, skip_bad_images=True), str(tmp_path / "out")
  )
  assert result.num_images == {"train": 2, "val": 1, "test": 2}
  skipped = sorted(os.path.basename(p) for p, _ in result.skipped)
  assert skipped == ["broken.jpg", "cut.jpg", "gone.png"]
  assert "3 of 8 images" in caplog.text and "skipped" in caplog.text
  assert [e["image_id"] for e in read_split(result.builder_dir, "test")] == [13, 14]


def test_missing_image_is_an_error_naming_its_path(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path, missing=True)
  with pytest.raises(UserError, match=r"1 of 6 images cannot be used: .*gone\.png: missing"):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def test_too_few_captions(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path, short=True)
  with pytest.raises(
    UserError,
    match=r"few\.png: 2 caption\(s\), data.captions_per_image is 5 "
    r"\(fix or remove them, lower data.captions_per_image",
  ):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  result = builders.build(
    data_config(json_path, image_root, captions_per_image=2), str(tmp_path / "out2")
  )
  assert result.num_images["train"] == 3
  assert read_split(result.builder_dir, "train")[2]["captions"] == [
    "a photo number 0 of few",
    "a photo number 1 of few",
  ]


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


def test_every_bad_image_is_named_with_its_own_reason_before_any_shard(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(
    tmp_path, corrupt=True, truncated=True, missing=True, short=True, svg=True, empty=True
  )
  # SVGs are drawn now: these two are not SVGs resvg may draw.
  with open(os.path.join(image_root, "logo.svg"), "w") as f:
    f.write('<svg xmlns="http://www.w3.org/2000/svg"><rect></svg>')
  with open(os.path.join(image_root, "drawing.png"), "w") as f:
    f.write('<svg xmlns="http://www.w3.org/2000/svg"><image href="/etc/x.png"/></svg>')
  out = tmp_path / "out"
  with pytest.raises(UserError) as info:
    builders.build(data_config(json_path, image_root), str(out))
  message = str(info.value)
  assert "\n" not in message and message.startswith(json_path)
  items = message.split("images cannot be used: ", 1)[1].split(" (fix or")[0].split("; ")
  by_name = {
    os.path.basename(p): why
    for p, why in (item.split(": ", 1) for item in items if item != "and 2 more")
  }
  # Split order (train, val, test), then file order; the first five are shown.
  assert message.startswith(f"{json_path}: 7 of 12 images cannot be used: ")
  assert by_name == {
    "broken.jpg": "not an image in a format avg-jax reads (PNG, JPEG, WebP, GIF, BMP or SVG)",
    "few.png": "2 caption(s), data.captions_per_image is 5",
    "logo.svg": "cannot decode (SVG: mismatched tag at line 1)",
    "drawing.png": "unsupported SVG: refers to '/etc/x.png' outside the document (href)",
    "gone.png": "missing",
  }
  assert message.endswith(
    "; and 2 more (fix or remove them, lower data.captions_per_image, or "
    "set data.skip_bad_images=True to skip them)"
  )
  assert not out.exists()  # checked before any shard was written
  # Skipping: every reason reaches the result (and dataset_info.json through prepare).
  result = builders.build(data_config(json_path, image_root, skip_bad_images=True), str(out))
  assert result.num_images == {"train": 2, "val": 1, "test": 2}
  skipped = {os.path.basename(p): why for p, why in result.skipped}
  assert skipped["zero.png"] == "empty file (0 bytes)"
  assert skipped["cut.jpg"].startswith("cannot decode (OSError: ")
  assert len(skipped) == 7


def test_undecodable_image_found_while_writing_is_reported(karpathy_files, tmp_path, monkeypatch):
  # An image that passed the check and then failed in the shard writer (changed on disk in
  # between): still one error naming it with its reason, after the shards.
  from avg_jax.data import images

  json_path, image_root = karpathy_files(tmp_path, corrupt=True)
  monkeypatch.setattr(images, "check_file", lambda path: "")
  with pytest.raises(
    UserError,
    match=r"^1 of 6 images failed to decode while writing the "
    r"records: .*broken\.jpg: UnidentifiedImageError: .*"
    r"skip_bad_images=True",
  ):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def _write_json_bytes(tmp_path, karpathy_files, mutate):
  json_path, image_root = karpathy_files(tmp_path)
  raw = mutate(open(json_path, "rb").read())
  open(json_path, "wb").write(raw)
  return json_path, image_root


def test_non_utf8_byte_names_the_image_entry(karpathy_files, tmp_path):
  # images[2] is c.png; its second caption gets a Latin-1 byte.
  json_path, image_root = _write_json_bytes(
    tmp_path, karpathy_files, lambda raw: raw.replace(b"number 1 of c", b"number 1 of \xe9")
  )
  with pytest.raises(
    UserError,
    match=r"dataset_test\.json: images\[2\]\.sentences\[1\]\.raw: "
    r"byte 0xe9 at offset \d+ \(line 1\) is not valid UTF-8$",
  ):
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))


def test_non_utf8_outside_entries_and_utf16_and_bom(karpathy_files, tmp_path):
  json_path, image_root = _write_json_bytes(
    tmp_path, karpathy_files, lambda raw: raw.replace(b'"images"', b'"\xffimages"')
  )
  with pytest.raises(
    UserError,
    match=r"dataset_test\.json: byte 0xff at offset \d+ \(line 1\) "
    r"is not valid UTF-8$",
  ):
    builders.build(data_config(json_path, image_root), str(tmp_path / "o1"))
  text = open(json_path, "rb").read().replace(b'"\xffimages"', b'"images"').decode()
  open(json_path, "wb").write(text.encode("utf-16"))
  with pytest.raises(
    UserError,
    match=r"byte 0xff at offset 0 \(line 1\) is not valid UTF-8 "
    r"\(UTF-16\? save it as UTF-8\)",
  ):
    builders.build(data_config(json_path, image_root), str(tmp_path / "o2"))
  open(json_path, "wb").write(b"\xef\xbb\xbf" + text.encode())  # a UTF-8 byte order mark
  assert (
    builders.build(data_config(json_path, image_root), str(tmp_path / "o3")).num_images["test"] == 2
  )


def test_malformed_json_message_says_where_once(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path)
  with open(json_path, "w") as f:
    f.write('{"images": [{"filename": "a.png, "split": "train"}]}')
  with pytest.raises(UserError) as info:
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  assert re.search(
    r"malformed JSON: Expecting ',' delimiter at line 1 column \d+$", str(info.value)
  )
  with open(json_path, "w") as f:
    f.write('{"images": [{"filename": "a.png')
  with pytest.raises(UserError) as info:
    builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  assert str(info.value).endswith(
    "malformed JSON: Unterminated string starting at line 1 column 26"
  )
  assert " at at " not in str(info.value)


def _transparent_pngs(folder):
  """8x8 PNGs whose right half is fully transparent (colour data black, green, ...)."""
  out = {}
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[:, :4] = (255, 0, 0, 255)  # opaque red
  rgba[:, 4:] = (0, 0, 0, 0)  # transparent black
  rgba[0, 0] = (255, 0, 0, 128)  # half-transparent red
  out["RGBA"] = Image.fromarray(rgba, "RGBA")
  la = np.zeros((8, 8, 2), np.uint8)
  la[:, :4] = (50, 255)
  out["LA"] = Image.fromarray(la, "LA")
  indices = np.repeat(np.array([[0] * 4 + [1] * 4], np.uint8), 8, 0)
  indices[0, 0] = 2
  palette = Image.fromarray(indices, "P")
  palette.putpalette([255, 0, 0, 0, 255, 0, 255, 0, 0] + [0] * 759)
  out["P"] = palette  # saved with transparency bytes: green alpha 0, second red alpha 128
  rgb = np.zeros((8, 8, 3), np.uint8)
  rgb[:, :4] = (255, 0, 0)
  rgb[:, 4:] = (0, 0, 255)
  out["RGB"] = Image.fromarray(rgb)  # saved with a tRNS colour: blue is transparent
  paths = {}
  for mode, image in out.items():
    paths[mode] = str(folder / f"{mode}.png")
    extra = {"P": dict(transparency=bytes([255, 0, 128])), "RGB": dict(transparency=(0, 0, 255))}
    image.save(paths[mode], **extra.get(mode, {}))
  return paths


def test_transparent_pixels_become_white_without_warnings(tmp_path, capfd):
  from avg_jax.data import images

  paths = _transparent_pngs(tmp_path)
  # Transparency as bytes: the case where PIL's convert("RGB") warns on stderr.
  assert Image.open(paths["P"]).info["transparency"] == bytes([255, 0, 128])
  opaque = {"RGBA": (255, 0, 0), "LA": (50, 50, 50), "P": (255, 0, 0), "RGB": (255, 0, 0)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # any warning fails the test
    for mode, path in paths.items():
      assert images.check_file(path) == ""
      pixels = images.load_resized(path, 8)
      assert (pixels[1:, :4] == opaque[mode]).all(), mode
      assert (pixels[:, 4:] == 255).all(), mode  # white, not the hidden colour data
  # Half-transparent red over white: (255, 127, 127) up to rounding.
  for mode in ("RGBA", "P"):
    np.testing.assert_allclose(images.load_resized(paths[mode], 8)[0, 0], (255, 127, 127), atol=1)
  assert capfd.readouterr().err == ""


def test_transparent_png_in_a_dataset_is_composited_on_white(karpathy_files, tmp_path):
  json_path, image_root = karpathy_files(tmp_path)
  Image.fromarray(np.zeros((24, 24, 4), np.uint8), "RGBA").save(os.path.join(image_root, "c.png"))
  result = builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  np.testing.assert_array_equal(
    read_split(result.builder_dir, "val")[0]["image"], np.full((16, 16, 3), 255, np.uint8)
  )


def test_svg_images_in_a_dataset_are_drawn_on_white(karpathy_files, tmp_path):
  # Real clip art ships SVG (Tux Paint: 248 of 1 033 stamps); an SVG under a .png name too.
  json_path, image_root = karpathy_files(tmp_path, svg=True)
  square = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 4 4">'
    '<rect x="1" y="1" width="2" height="2" fill="#0000ff"/></svg>'
  )
  for name in ("logo.svg", "drawing.png"):
    with open(os.path.join(image_root, name), "w") as f:
      f.write(square)
  result = builders.build(data_config(json_path, image_root), str(tmp_path / "out"))
  assert result.num_images == {"train": 4, "val": 1, "test": 2}  # restval joins train
  train = read_split(result.builder_dir, "train")
  drawn = [r["image"] for r in train if int(r["image_id"]) in (19, 20)]
  assert len(drawn) == 2
  for pixels in drawn:  # 16 x 16: a blue centre on white (transparent) corners
    np.testing.assert_array_equal(pixels[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(pixels[8, 8], [0, 0, 255])


def test_check_file_reasons(tmp_path, monkeypatch):
  from avg_jax.data import images

  Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "ok.png")
  (tmp_path / "page.txt").write_text("<html>not an image</html>")
  (tmp_path / "inline.svg.txt").write_bytes(b"\xef\xbb\xbf  <svg width='1'/>")  # BOM, spaces
  assert images.check_file(str(tmp_path / "ok.png")) == ""
  assert images.check_file(str(tmp_path / "nope.png")) == "missing"
  assert images.check_file(str(tmp_path / "page.txt")) == (
    "not an image in a format avg-jax reads (PNG, JPEG, WebP, GIF, BMP or SVG)"
  )
  assert images.check_file(str(tmp_path / "inline.svg.txt")) == ""  # drawn by resvg
  assert images.check_file(str(tmp_path)) == "cannot read (Is a directory)"
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 576 pixels > 2 x the limit
  assert images.check_file(str(tmp_path / "ok.png")) == (
    "too large (576 pixels; PIL refuses more than 200)"
  )


def test_karpathy_local_config_prepares_own_images(repo_root, tmp_path):
  # configs/karpathy_local.py:tiny on a folder of one-caption PNGs (RGBA clip-art style):
  # no other override than the two paths.
  from avg_jax import config as config_lib
  from avg_jax.stages import prepare

  rng = np.random.default_rng(0)
  # Made-up words: enough distinct text for the config's 200 SentencePiece pieces (fewer
  # would be the one-line error "vocab_size=200 ... at most N for these captions").
  words = [
    "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 8))) for _ in range(150)
  ]
  (tmp_path / "images").mkdir()
  records = []
  for i in range(100):
    pixels = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "images" / f"{i}.png")
    caption = " ".join(rng.choice(words, 6))
    split = "train" if i < 80 else "val" if i < 90 else "test"
    records.append({"filename": f"{i}.png", "split": split, "sentences": [{"raw": caption}]})
  (tmp_path / "data.json").write_text(json.dumps({"images": records}))
  config = config_lib.load_config(
    str(repo_root / "configs/karpathy_local.py:tiny"),
    [f"data.karpathy_json={tmp_path / 'data.json'}", f"data.image_root={tmp_path / 'images'}"],
  )
  prepare.run(config, str(tmp_path / "w"))
  info = dataset.load_info(str(tmp_path / "w"))
  assert {s: v["num_captions"] for s, v in info["splits"].items()} == {
    "train": 80,
    "val": 10,
    "test": 10,
  }
  assert info["captions_per_image"] == 1 and info["image_size"] == [32, 32]
