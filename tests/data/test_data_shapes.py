"""avg_shapes: determinism, rendering, and captions consistent with the pictures."""

import json
import math
import os
import re

import ml_collections
import numpy as np
import pytest

from avg_jax.data import builders, shapes

COLOR_WORDS = "red|green|blue|yellow|purple|orange|white"
SHAPE_WORDS = "circle|square|triangle|diamond|cross"
MENTION = re.compile(rf"\b(?:(small|large) )?({COLOR_WORDS}) ({SHAPE_WORDS})\b")
MENTION_TEXT = rf"(?:an? )?(?:(?:small|large) )?(?:{COLOR_WORDS}) (?:{SHAPE_WORDS})"
PLACES = (
  "top left|upper left|top right|upper right|bottom left|lower left|bottom right|"
  "lower right|top|bottom|left|right|centre|center|middle"
)
WITH_PLACE = re.compile(rf"({MENTION_TEXT}) (?:in|at|on|near) the ({PLACES})\b")
RELATION = re.compile(
  rf"({MENTION_TEXT}) (above|over|below|under|to the left of|to the right of) "
  rf"({MENTION_TEXT})"
)
COUNT = re.compile(r"\b(one|two|three) (other )?(shapes?|objects)\b")

# Hand-written expectations, independent of the generator's tables.
PLACE_CELLS = {
  "top left": (0, 0),
  "upper left": (0, 0),
  "top right": (0, 2),
  "upper right": (0, 2),
  "bottom left": (2, 0),
  "lower left": (2, 0),
  "bottom right": (2, 2),
  "lower right": (2, 2),
  "top": (0, 1),
  "bottom": (2, 1),
  "left": (1, 0),
  "right": (1, 2),
  "centre": (1, 1),
  "center": (1, 1),
  "middle": (1, 1),
}
NUMBERS = {"one": 1, "two": 2, "three": 3}


def looks_like(color: str, rgb) -> bool:
  """Channel rules for each colour word (not the generator's palette)."""
  r, g, b = (int(v) for v in rgb)
  return {
    "red": r > g + 100 and r > b + 100,
    "green": g > r + 60 and g > b + 60,
    "blue": b > r + 100 and b > g + 60,
    "yellow": r > b + 100 and g > b + 100 and abs(r - g) < 60,
    "purple": r > g + 40 and b > g + 80,
    "orange": r > g + 60 and g > b + 50,
    "white": min(r, g, b) > 200,
  }[color]


def find_object(objects, mention_text):
  size, color, shape = MENTION.search(mention_text).groups()
  matches = [
    o
    for o in objects
    if o["color"] == color and o["shape"] == shape and (size is None or o["size"] == size)
  ]
  assert len(matches) == 1, (mention_text, objects)
  return matches[0]


def cell_of(obj, image_size):
  x, y = obj["center_xy"]
  cell = image_size / 3
  return int(y // cell), int(x // cell)


def check_example(ex, image_size):
  """Every check that ties captions, attributes and pixels together."""
  attributes = json.loads(ex["attributes"])
  objects = attributes["objects"]
  assert 1 <= len(objects) <= 3
  assert len({(o["shape"], o["color"]) for o in objects}) == len(objects)
  assert len({(o["row"], o["col"]) for o in objects}) == len(objects)
  for o in objects:
    # The stored cell is where the centre really is, and the centre pixel has the colour.
    assert cell_of(o, image_size) == (o["row"], o["col"])
    x, y = o["center_xy"]
    pixel = ex["image"][int(y), int(x)]
    assert looks_like(o["color"], pixel), (o, pixel)
  mentioned = set()
  for caption in ex["captions"]:
    mentions = list(MENTION.finditer(caption))
    assert mentions, caption
    # No shape or colour word outside a "[size] colour shape" phrase.
    assert len(re.findall(rf"\b(?:{SHAPE_WORDS})\b", caption)) == len(mentions), caption
    assert len(re.findall(rf"\b(?:{COLOR_WORDS})\b", caption)) == len(mentions), caption
    for m in mentions:
      obj = find_object(objects, m.group(0))  # only objects present are mentioned
      mentioned.add((obj["shape"], obj["color"]))
      x, y = obj["center_xy"]
      assert looks_like(m.group(2), ex["image"][int(y), int(x)]), (caption, obj)
    for m in WITH_PLACE.finditer(caption):
      obj = find_object(objects, m.group(1))
      assert cell_of(obj, image_size) == PLACE_CELLS[m.group(2)], (caption, obj)
    for m in RELATION.finditer(caption):
      a, b = find_object(objects, m.group(1)), find_object(objects, m.group(3))
      (ax, ay), (bx, by) = a["center_xy"], b["center_xy"]
      holds = {
        "above": ay < by,
        "over": ay < by,
        "below": ay > by,
        "under": ay > by,
        "to the left of": ax < bx,
        "to the right of": ax > bx,
      }[m.group(2)]
      assert holds, (caption, a, b)
    for m in COUNT.finditer(caption):
      expected = len(objects) - 1 if m.group(2) else len(objects)
      assert NUMBERS[m.group(1)] == expected, (caption, objects)
  # Together the captions describe every object.
  assert mentioned == {(o["shape"], o["color"]) for o in objects}


@pytest.mark.parametrize("image_size,count", [(32, 300), (64, 200)])
def test_captions_and_attributes_match_the_pixels(image_size, count):
  examples = list(shapes.generate("train", count, image_size, seed=3))
  assert len(examples) == count
  for ex in examples:
    assert ex["image"].shape == (image_size, image_size, 3)
    assert ex["image"].dtype == np.uint8
    assert len(ex["captions"]) == 5
    check_example(ex, image_size)
  # A small attribute vocabulary: images share attributes and whole captions.
  captions = [c for ex in examples for c in ex["captions"]]
  assert len(set(captions)) < len(captions)
  words = {w for c in captions for w in re.findall(r"[a-z]+", c)}
  assert len(words) < 80


def test_caption_families_vary_in_wording_and_detail():
  examples = list(shapes.generate("val", 100, 32, seed=0))
  for k in range(5):
    assert len({ex["captions"][k] for ex in examples}) > 20
  # Detail differs: some captions give sizes and positions, others only colours.
  all_captions = [c for ex in examples for c in ex["captions"]]
  assert any(re.search(r"\b(small|large)\b", c) for c in all_captions)
  assert any(
    not re.search(r"\b(small|large|top|bottom|left|right|centre|middle|center)\b", c)
    for c in all_captions
  )
  assert any(RELATION.search(c) for c in all_captions)
  extra = list(shapes.generate("val", 3, 32, seed=0, captions_per_image=7))
  assert all(len(ex["captions"]) == 7 for ex in extra)


def test_generation_is_deterministic_and_prefix_stable():
  a = list(shapes.generate("train", 300, 32, seed=5))
  b = list(shapes.generate("train", 300, 32, seed=5))
  short = list(shapes.generate("train", 10, 32, seed=5))
  other = list(shapes.generate("train", 10, 32, seed=6))
  val = list(shapes.generate("val", 10, 32, seed=5))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["captions"] == y["captions"] and x["attributes"] == y["attributes"]
  for x, y in zip(short, a):  # image i does not depend on how many are generated
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["captions"] == y["captions"]
  assert not np.array_equal(
    np.stack([e["image"] for e in other]), np.stack([e["image"] for e in short])
  )
  assert not np.array_equal(
    np.stack([e["image"] for e in val]), np.stack([e["image"] for e in short])
  )


def test_rendered_areas_match_the_shape_geometry():
  # One object per image, centred, radius r: the filled pixel count approximates the area.
  size, r = 96, 13.6
  n = len(shapes.SHAPES)
  scenes = dict(
    num_objects=np.ones(n, int),
    shape=np.array([[k, 0, 0] for k in range(n)]),
    center=np.full((n, 3, 2), 48.0),
    radius=np.full((n, 3), r),
    rgb=np.tile(np.array([230, 20, 20], np.int16), (n, 3, 1)),
    background=np.full(n, 30),
  )
  images = shapes.render(scenes, size, np.random.default_rng(0))
  filled = (images[..., 0] > 150).sum(axis=(1, 2))
  # Hand-computed areas: circle pi r^2; square side 1.6 r; triangle base 2 r, height 1.8 r;
  # diamond 2 r^2; cross two 2r x 0.6r bars minus their 0.6r x 0.6r overlap.
  expected = {
    "circle": math.pi * r * r,
    "square": (1.6 * r) ** 2,
    "triangle": 1.8 * r * r,
    "diamond": 2 * r * r,
    "cross": 2 * 1.2 * r * r - 0.36 * r * r,
  }
  for k, name in enumerate(shapes.SHAPES):
    assert abs(filled[k] - expected[name]) / expected[name] < 0.05, (name, filled[k])
  assert (images[..., 0] <= 150).sum() > 0  # the background is not painted


def _data_config(seed: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      name="avg_shapes",
      num_train=20,
      num_val=4,
      num_test=4,
      image_size=32,
      generator_seed=seed,
      captions_per_image=5,
      image_encoding="png",
      jpeg_quality=95,
      karpathy_json="",
      image_root="",
      skip_bad_images=False,
      examples_per_shard=1024,
    )
  )


def _record_bytes(builder_dir: str) -> dict[str, bytes]:
  out = {}
  for name in sorted(os.listdir(builder_dir)):
    if ".array_record" in name:
      with open(os.path.join(builder_dir, name), "rb") as f:
        out[name.split(".array_record")[0]] = f.read()
  return out


def test_builder_writes_identical_bytes_for_the_same_seed(tmp_path):
  first = builders.build(_data_config(1), str(tmp_path / "a"))
  second = builders.build(_data_config(1), str(tmp_path / "b"))
  third = builders.build(_data_config(2), str(tmp_path / "c"))
  assert first.num_images == {"train": 20, "val": 4, "test": 4}
  a, b, c = (_record_bytes(r.builder_dir) for r in (first, second, third))
  assert sorted(a) == ["avg_shapes-test", "avg_shapes-train", "avg_shapes-val"]
  assert a == b
  assert all(a[k] != c[k] for k in a)
