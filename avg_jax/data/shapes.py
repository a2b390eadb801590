"""`avg_shapes`: the embedded dataset, generated from a seed (no downloads).

Each image is a noisy grey background with 1-3 flat-coloured objects. An object has a shape,
a colour, a size and one of the 9 cells of a 3x3 grid (its position, jittered inside the cell).
Objects sit in distinct cells and never overlap, so every object's centre pixel shows its own
colour; within one image no two objects share (shape, colour), so every caption phrase names
exactly one object. The attribute vocabulary is small (5 shapes, 7 colours, 2 sizes, 9
positions): images share attributes, which makes retrieval learnable but not trivial.

Captions come from 5 template families with varied wording and detail (full listing,
relation, count, one object in focus, colours only); caption k uses family k % 5.

Determinism: scenes are drawn in chunks of `CHUNK` images, each chunk from its own
`SeedSequence([seed, split, chunk])`, so an image depends only on (seed, split, index), not on
how many images are generated.
"""

import json
from collections.abc import Iterable, Iterator

import numpy as np

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
# RGB of each colour; pairwise distances are >= 80, far above jitter + noise (< 25).
PALETTE = np.array(
  [
    (220, 50, 47),
    (60, 180, 75),
    (40, 90, 220),
    (235, 215, 50),
    (145, 60, 190),
    (245, 130, 40),
    (240, 240, 240),
  ],
  np.int16,
)
SIZES = ("small", "large")
# Radius as a fraction of half a grid cell.
SIZE_RADIUS = (0.5, 0.85)
GRID = 3
POSITIONS = (
  "top left",
  "top",
  "top right",
  "left",
  "centre",
  "right",
  "bottom left",
  "bottom",
  "bottom right",
)  # index = row * 3 + col
MAX_OBJECTS = 3
OBJECT_COUNT_PROBS = (0.3, 0.4, 0.3)  # 1, 2, 3 objects
CHUNK = 256
COLOR_JITTER = 12  # per channel, per object
PIXEL_NOISE = 5  # per channel, per pixel
NUM_FAMILIES = 5

_NUMBER_WORDS = ("zero", "one", "two", "three")


def split_code(split: str) -> int:
  return SPLITS.index(split)


# --- Scenes ------------------------------------------------------------------------------------


def sample_scenes(rng: np.random.Generator, count: int, image_size: int) -> dict:
  """Draws `count` scenes as arrays (slot k is used when k < num_objects).

  Returns a dict of `num_objects [B]`, `shape, color, size, row, col [B, 3]` (int),
  `center [B, 3, 2]` (x, y in pixels), `radius [B, 3]`, `rgb [B, 3, 3]`, `background [B]`.
  """
  b = count
  num_objects = rng.choice(np.arange(1, MAX_OBJECTS + 1), size=b, p=OBJECT_COUNT_PROBS)
  cells = np.argsort(rng.random((b, GRID * GRID)), axis=1)[:, :MAX_OBJECTS]  # distinct cells
  shape = rng.integers(0, len(SHAPES), (b, MAX_OBJECTS))
  color = rng.integers(0, len(COLORS), (b, MAX_OBJECTS))
  # Make (shape, colour) unique within an image by shifting the colour of a repeated pair:
  # a caption phrase such as "red circle" then names exactly one object.
  for k in range(1, MAX_OBJECTS):
    for _ in range(k):
      clash = np.zeros(b, bool)
      for j in range(k):
        clash |= (shape[:, k] == shape[:, j]) & (color[:, k] == color[:, j])
      color[:, k] = np.where(clash, (color[:, k] + 1) % len(COLORS), color[:, k])
  size = rng.integers(0, len(SIZES), (b, MAX_OBJECTS))
  jitter = rng.uniform(-1.0, 1.0, (b, MAX_OBJECTS, 2))
  color_jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, (b, MAX_OBJECTS, 3))
  background = rng.integers(15, 61, b)

  half_cell = image_size / GRID / 2
  radius = np.asarray(SIZE_RADIUS)[size] * half_cell
  # Keep the whole object inside its cell (half a pixel of margin) so objects never overlap.
  max_shift = np.maximum(half_cell - radius - 0.5, 0.0)
  row, col = cells // GRID, cells % GRID
  center = np.stack([(col + 0.5) * 2 * half_cell, (row + 0.5) * 2 * half_cell], axis=-1)
  center = center + jitter * max_shift[..., None]
  rgb = PALETTE[color] + color_jitter
  return dict(
    num_objects=num_objects,
    shape=shape,
    color=color,
    size=size,
    row=row,
    col=col,
    center=center,
    radius=radius,
    rgb=rgb,
    background=background,
  )


def _shape_masks(dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
  """`[len(SHAPES), B, S, S]` inside-tests for every shape, in `SHAPES` order.

  `dx, dy [B, S, S]` are pixel-centre offsets from the object centre; `r [B, 1, 1]` radius.
  """
  adx, ady = np.abs(dx), np.abs(dy)
  circle = dx * dx + dy * dy <= r * r
  square = (adx <= 0.8 * r) & (ady <= 0.8 * r)
  # Upward triangle: apex at dy = -r, base at dy = 0.8 r with half-width r.
  triangle = (dy <= 0.8 * r) & (adx <= (dy + r) / 1.8)
  diamond = adx + ady <= r
  arm = 0.3 * r
  cross = ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
  return np.stack([circle, square, triangle, diamond, cross])


def render(scenes: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Rasterises scenes (from `sample_scenes`) into `uint8 [B, S, S, 3]` images."""
  b = scenes["num_objects"].shape[0]
  s = image_size
  coords = np.arange(s, dtype=np.float32) + 0.5
  noise = rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, (b, s, s, 3)).astype(np.int16)
  image = scenes["background"].astype(np.int16)[:, None, None, None] + noise
  rows = np.arange(b)
  for k in range(MAX_OBJECTS):
    cx = scenes["center"][:, k, 0].astype(np.float32)[:, None, None]
    cy = scenes["center"][:, k, 1].astype(np.float32)[:, None, None]
    r = scenes["radius"][:, k].astype(np.float32)[:, None, None]
    dx = coords[None, None, :] - cx  # [B, 1, S]
    dy = coords[None, :, None] - cy  # [B, S, 1]
    dx, dy = np.broadcast_arrays(dx, dy)
    mask = _shape_masks(dx, dy, r)[scenes["shape"][:, k], rows]  # [B, S, S]
    mask &= (k < scenes["num_objects"])[:, None, None]
    color = scenes["rgb"][:, k].astype(np.int16)[:, None, None, :]
    image = np.where(mask[..., None], color + noise, image)
  return np.clip(image, 0, 255).astype(np.uint8)


def scene_objects(scenes: dict, i: int) -> list[dict]:
  """The objects of scene `i` as JSON-ready dicts."""
  objects = []
  for k in range(int(scenes["num_objects"][i])):
    row, col = int(scenes["row"][i, k]), int(scenes["col"][i, k])
    objects.append(
      dict(
        shape=SHAPES[scenes["shape"][i, k]],
        color=COLORS[scenes["color"][i, k]],
        size=SIZES[scenes["size"][i, k]],
        position=POSITIONS[row * GRID + col],
        row=row,
        col=col,
        center_xy=[round(float(v), 3) for v in scenes["center"][i, k]],
        radius=round(float(scenes["radius"][i, k]), 3),
      )
    )
  return objects


def relations(objects: list[dict]) -> list[tuple[int, str, int]]:
  """Every true (i, relation, j) between distinct objects, from their grid cells."""
  out = []
  for i, a in enumerate(objects):
    for j, b in enumerate(objects):
      if i == j:
        continue
      if a["row"] < b["row"]:
        out.append((i, "above", j))
      if a["row"] > b["row"]:
        out.append((i, "below", j))
      if a["col"] < b["col"]:
        out.append((i, "left of", j))
      if a["col"] > b["col"]:
        out.append((i, "right of", j))
  return out


# --- Captions ----------------------------------------------------------------------------------

_RELATION_WORDS = {
  "above": ("above", "over"),
  "below": ("below", "under"),
  "left of": ("to the left of",),
  "right of": ("to the right of",),
}


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _describe(obj: dict, rng: np.random.Generator, *, detail: str) -> str:
  """ "a small red circle" (detail="full"), "a red circle" ("color") or either ("any")."""
  if detail == "any":
    detail = _pick(rng, ("full", "color"))
  words = ([obj["size"]] if detail == "full" else []) + [obj["color"], obj["shape"]]
  return f"{_article(words[0])} {' '.join(words)}"


def _where(obj: dict, rng: np.random.Generator) -> str:
  """A position phrase such as "in the top left corner" or "on the left"."""
  row, col = obj["row"], obj["col"]
  if (row, col) == (1, 1):
    return _pick(rng, ("in the centre", "in the middle", "in the center"))
  vertical = {0: ("top", "upper"), 2: ("bottom", "lower")}
  horizontal = {0: "left", 2: "right"}
  if row != 1 and col != 1:
    name = f"{_pick(rng, vertical[row])} {horizontal[col]}"
    return _pick(rng, (f"in the {name}", f"at the {name}", f"in the {name} corner"))
  if row != 1:
    name = vertical[row][0]
    return _pick(rng, (f"at the {name}", f"near the {name}"))
  name = horizontal[col]
  return _pick(rng, (f"on the {name}", f"on the {name} side"))


def _join(parts: list[str]) -> str:
  if len(parts) == 1:
    return parts[0]
  return ", ".join(parts[:-1]) + " and " + parts[-1]


def _family_listing(objects, rng):
  parts = [f"{_describe(o, rng, detail='full')} {_where(o, rng)}" for o in objects]
  prefix = _pick(rng, ("", "a picture of ", "an image with ", "there is "))
  return prefix + _join(parts)


def _family_relation(objects, rng):
  rels = relations(objects)
  if not rels:
    obj = objects[0]
    background = _pick(rng, ("dark", "grey", "plain"))
    return f"{_describe(obj, rng, detail='full')} on a {background} background"
  i, rel, j = rels[int(rng.integers(len(rels)))]
  text = (
    f"{_describe(objects[i], rng, detail='any')} {_pick(rng, _RELATION_WORDS[rel])} "
    f"{_describe(objects[j], rng, detail='any')}"
  )
  return text


def _family_count(objects, rng):
  n = len(objects)
  if n == 1:
    o = objects[0]
    return _pick(
      rng, (f"a single {o['color']} {o['shape']}", f"one {o['size']} {o['color']} {o['shape']}")
    )
  listed = _join([_describe(o, rng, detail="color") for o in objects])
  noun = _pick(rng, ("shapes", "objects"))
  return f"{_NUMBER_WORDS[n]} {noun}: {listed}"


def _family_focus(objects, rng):
  k = int(rng.integers(len(objects)))
  text = f"{_describe(objects[k], rng, detail='any')} {_where(objects[k], rng)}"
  others = len(objects) - 1
  if others:
    noun = "shape" if others == 1 else "shapes"
    text += f" and {_NUMBER_WORDS[others]} other {noun}"
  return _pick(rng, ("", "a picture with ", "an image showing ")) + text


def _family_colors(objects, rng):
  if len(objects) == 1:
    return _describe(objects[0], rng, detail="full")
  order = rng.permutation(len(objects))
  return _join([_describe(objects[k], rng, detail="color") for k in order])


_FAMILIES = (_family_listing, _family_relation, _family_count, _family_focus, _family_colors)


def write_captions(objects: list[dict], rng: np.random.Generator, count: int) -> list[str]:
  """`count` captions for one scene; caption k comes from template family k % 5."""
  return [_FAMILIES[k % NUM_FAMILIES](objects, rng) for k in range(count)]


# --- Whole splits ------------------------------------------------------------------------------


def generate(
  split: str,
  num_images: int,
  image_size: int,
  seed: int,
  captions_per_image: int = 5,
  first_id: int = 0,
  start: int = 0,
) -> Iterator[dict]:
  """Yields examples `start .. num_images - 1` of `split` in index order.

  Each example: `image_id` (first_id + index), `index`, `image uint8 [S, S, 3]`,
  `captions` (list of `captions_per_image` str), `file_name`, `attributes` (scene JSON).
  Example i is the same whatever `start` and `num_images` are (so shards can be made apart).
  """
  for chunk_start in range(start - start % CHUNK, num_images, CHUNK):
    chunk = chunk_start // CHUNK
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code(split), chunk]))
    # Always draw a whole chunk so that image i does not depend on num_images.
    scenes = sample_scenes(rng, CHUNK, image_size)
    images = render(scenes, image_size, rng)
    caption_rng = np.random.default_rng(np.random.SeedSequence([seed, split_code(split), chunk, 1]))
    for i in range(min(CHUNK, num_images - chunk_start)):
      index = chunk_start + i
      objects = scene_objects(scenes, i)
      # Captions draw from one stream per chunk: earlier images' draws happen even when
      # they are before `start`.
      captions = write_captions(objects, caption_rng, captions_per_image)
      if index < start:
        continue
      attributes = dict(
        objects=objects,
        relations=[list(r) for r in relations(objects)],
        background=int(scenes["background"][i]),
        image_size=image_size,
      )
      yield dict(
        image_id=first_id + index,
        index=index,
        image=images[i],
        captions=captions,
        file_name=f"{split}/{index:06d}.png",
        attributes=json.dumps(attributes, sort_keys=True, separators=(",", ":")),
      )


class AttributeCounter:
  """Counts of shapes, colours, sizes, positions and object counts, one scene at a time."""

  def __init__(self) -> None:
    self.counts: dict[str, dict[str, int]] = {
      "objects": {},
      "shape": {},
      "color": {},
      "size": {},
      "position": {},
    }

  def add(self, attributes_json: str) -> None:
    objects = json.loads(attributes_json)["objects"]
    n = str(len(objects))
    self.counts["objects"][n] = self.counts["objects"].get(n, 0) + 1
    for o in objects:
      for key in ("shape", "color", "size", "position"):
        self.counts[key][o[key]] = self.counts[key].get(o[key], 0) + 1

  def frequencies(self) -> dict[str, dict[str, int]]:
    """Per attribute, `{value: count}` by decreasing count (ties in first-seen order)."""
    return {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in self.counts.items()}


def attribute_frequencies(attributes_json: Iterable[str]) -> dict[str, dict[str, int]]:
  """Counts of shapes, colours, sizes, positions and object counts over scenes."""
  counter = AttributeCounter()
  for text in attributes_json:
    counter.add(text)
  return counter.frequencies()


# --- Pseudo queries ----------------------------------------------------------------------------
#
# The paper's transductive protocol trains the generator on LLM-written "pseudo queries" of the
# indexed images besides the training captions. These stand in for them: another phrasing
# family than the captions above (nouns before attributes, synonyms, other sentence frames),
# describing only part of a scene, and sometimes wrong, as a real captioner is. Every pseudo
# query contains one of `PSEUDO_MARKERS`, words that no caption template uses, so a pseudo query
# can never equal an evaluation caption.

PSEUDO_MARKERS = (
  "depicts",
  "features",
  "visible",
  "containing",
  "illustration",
  "drawing",
  "scene",
  "graphic",
  "composition",
)
_SHAPE_SYNONYMS = {
  "circle": ("circle", "disc", "round shape"),
  "square": ("square", "box", "block"),
  "triangle": ("triangle", "triangular shape"),
  "diamond": ("diamond", "rhombus", "diamond shape"),
  "cross": ("cross", "plus sign", "plus shape"),
}
_COLOR_SYNONYMS = {
  "red": ("red", "scarlet"),
  "green": ("green", "emerald"),
  "blue": ("blue", "navy"),
  "yellow": ("yellow", "golden"),
  "purple": ("purple", "violet"),
  "orange": ("orange", "amber"),
  "white": ("white", "ivory"),
}
_SIZE_SYNONYMS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
_PSEUDO_PLACES = {
  (0, 0): "toward the upper left",
  (0, 1): "near the upper edge",
  (0, 2): "toward the upper right",
  (1, 0): "near the left edge",
  (1, 1): "in the middle",
  (1, 2): "near the right edge",
  (2, 0): "toward the lower left",
  (2, 1): "near the lower edge",
  (2, 2): "toward the lower right",
}
# Share of pseudo queries that state one attribute wrongly (a colour, a place or the count).
PSEUDO_ERROR_RATE = 0.15
# Chance that a describer uses a synonym instead of the plain word (shape, colour or size).
PSEUDO_SYNONYM_RATE = 0.3
PSEUDO_FAMILIES = 5


def _word(table: dict, word: str, rng: np.random.Generator) -> str:
  """`word`, or with probability `PSEUDO_SYNONYM_RATE` one of its synonyms in `table`."""
  if rng.random() < PSEUDO_SYNONYM_RATE:
    return _pick(rng, table[word][1:])
  return word


def _corrupt(objects: list[dict], rng: np.random.Generator) -> tuple[list[dict], int]:
  """A copy of `objects` (and the stated count) with one attribute wrong, drawn by `rng`."""
  objects = [dict(o) for o in objects]
  count = len(objects)
  what = int(rng.integers(3))
  k = int(rng.integers(len(objects)))
  if what == 0:
    others = [c for c in COLORS if c != objects[k]["color"]]
    objects[k]["color"] = _pick(rng, others)
  elif what == 1:
    cells = [
      (r, c)
      for r in range(GRID)
      for c in range(GRID)
      if (r, c) != (objects[k]["row"], objects[k]["col"])
    ]
    objects[k]["row"], objects[k]["col"] = _pick(rng, cells)
  else:
    count = count + 1 if count < MAX_OBJECTS else count - 1
  return objects, count


def _noun_first(obj: dict, rng: np.random.Generator, *, size_p: float, place_p: float) -> str:
  """ "a disc, scarlet and tiny, in the upper left area": noun first, attributes after."""
  attrs = [_word(_COLOR_SYNONYMS, obj["color"], rng)]
  if rng.random() < size_p:
    attrs.append(_word(_SIZE_SYNONYMS, obj["size"], rng))
  noun = _word(_SHAPE_SYNONYMS, obj["shape"], rng)
  text = f"{_article(noun)} {noun}, {' and '.join(attrs)}"
  if rng.random() < place_p:
    text += f", {_PSEUDO_PLACES[(obj['row'], obj['col'])]}"
  return text


def _adjective_first(obj: dict, rng: np.random.Generator) -> str:
  """ "a violet rhombus" with synonyms (no size)."""
  words = [_word(_COLOR_SYNONYMS, obj["color"], rng), _word(_SHAPE_SYNONYMS, obj["shape"], rng)]
  return f"{_article(words[0])} {' '.join(words)}"


def _subset(objects: list[dict], rng: np.random.Generator) -> list[dict]:
  """One to all objects, in a random order: a describer mentions what caught its eye."""
  keep = int(rng.integers(1, len(objects) + 1))
  return [objects[k] for k in rng.permutation(len(objects))[:keep]]


def _pseudo_scene(objects, count, rng):
  parts = [_noun_first(o, rng, size_p=0.5, place_p=0.5) for o in _subset(objects, rng)]
  noun = "shape" if count == 1 else "shapes"
  return (
    f"{_pick(rng, ('the scene depicts', 'this drawing depicts'))} "
    f"{_NUMBER_WORDS[count]} {noun}; " + "; ".join(parts)
  )


def _pseudo_inventory(objects, count, rng):
  parts = []
  for o in _subset(objects, rng):
    attrs = [_word(_COLOR_SYNONYMS, o["color"], rng)]
    if rng.random() < 0.5:
      attrs.append(_word(_SIZE_SYNONYMS, o["size"], rng))
    if rng.random() < 0.6:
      attrs.append(_PSEUDO_PLACES[(o["row"], o["col"])])
    parts.append(f"{_word(_SHAPE_SYNONYMS, o['shape'], rng)} ({', '.join(attrs)})")
  return f"{_pick(rng, ('shapes visible', 'visible items'))}: " + ", ".join(parts)


def _pseudo_feature(objects, count, rng):
  o = objects[int(rng.integers(len(objects)))]
  text = (
    f"{_pick(rng, ('an illustration that features', 'a graphic that features'))} "
    f"{_noun_first(o, rng, size_p=0.7, place_p=0.8)}"
  )
  if count > 1 and rng.random() < 0.6:
    text += f", among {_NUMBER_WORDS[count]} items"
  return text


def _pseudo_layout(objects, count, rng):
  rels = relations(objects)
  if not rels:
    o = objects[0]
    return (
      f"a composition containing only {_adjective_first(o, rng)} "
      f"{_PSEUDO_PLACES[(o['row'], o['col'])]}"
    )
  i, rel, j = rels[int(rng.integers(len(rels)))]
  verb = {
    "above": "placed higher than",
    "below": "placed lower than",
    "left of": "further left than",
    "right of": "further right than",
  }[rel]
  return (
    f"a composition containing {_adjective_first(objects[i], rng)} {verb} "
    f"{_adjective_first(objects[j], rng)}"
  )


def _pseudo_palette(objects, count, rng):
  colours = [_word(_COLOR_SYNONYMS, o["color"], rng) for o in _subset(objects, rng)]
  return (
    f"{_pick(rng, ('a simple graphic', 'a flat illustration'))} with {_join(colours)} "
    f"{_pick(rng, ('forms', 'figures'))} visible on a dark ground"
  )


_PSEUDO = (_pseudo_scene, _pseudo_inventory, _pseudo_feature, _pseudo_layout, _pseudo_palette)


def pseudo_queries(attributes_json: str, rng: np.random.Generator, count: int) -> list[str]:
  """`count` pseudo queries for one scene (its `attributes` JSON); query k comes from pseudo
  family k % 5, and `PSEUDO_ERROR_RATE` of them state one attribute wrongly."""
  objects = json.loads(attributes_json)["objects"]
  out = []
  for k in range(count):
    described, stated_count = objects, len(objects)
    if rng.random() < PSEUDO_ERROR_RATE:
      described, stated_count = _corrupt(objects, rng)
    out.append(_PSEUDO[k % PSEUDO_FAMILIES](described, stated_count, rng))
  return out


def pseudo_query_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of image `index` of `split`'s pseudo queries (independent of the others)."""
  return np.random.default_rng(np.random.SeedSequence([seed, split_code(split), index, 2]))
