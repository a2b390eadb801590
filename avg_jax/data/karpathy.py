"""Reading a Karpathy-split JSON (Flickr30K, MS-COCO) into per-split image entries.

Format (DESIGN.md): `{"images": [{"filename", "filepath" (COCO), "imgid", "split",
"sentences": [{"raw": ...}, ...]}, ...]}`. `restval` joins `train`. An image lives at
`<image_root>/<filepath>/<filename>` or, when that does not exist (or there is no filepath),
`<image_root>/<filename>`. The builder follows the format, not the published counts.
"""

import concurrent.futures
import dataclasses
import json
import os
from typing import Iterator, Sequence

from PIL import Image

from avg_jax.data import images as images_lib
from avg_jax.errors import UserError

SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SPLITS = ("train", "val", "test")
# Errors PIL raises on missing, truncated or non-image files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Entry:
  image_id: int              # "imgid" (the image's index in the file when absent)
  split: str                 # train | val | test
  file_name: str             # "<filepath>/<filename>" or "<filename>"
  path: str                  # resolved image path (may not exist)
  captions: tuple[str, ...]  # every caption in file order ("raw", stripped)


def _require_key(obj, key: str, json_path: str, where: str):
  if not isinstance(obj, dict) or key not in obj:
    raise UserError(f"{json_path}: {where} is missing key {key!r}")
  return obj[key]


def _resolve_path(image_root: str, filepath: str, filename: str) -> str:
  candidates = []
  if filepath:
    candidates.append(os.path.join(image_root, filepath, filename))
  candidates.append(os.path.join(image_root, filename))
  for path in candidates:
    if os.path.isfile(path):
      return path
  return candidates[0]


def read_entries(json_path: str, image_root: str) -> dict[str, list[Entry]]:
  """Parses and validates the JSON; returns `{split: [Entry, ...]}` in file order.

  Raises `UserError` naming the file (and key / image index) for unreadable or malformed
  files, missing keys, unknown split names and duplicate image ids.
  """
  if not json_path:
    raise UserError("config data.karpathy_json is empty: give the Karpathy split JSON "
                    "(e.g. --config.data.karpathy_json=/data/dataset_flickr30k.json)")
  if not os.path.isfile(json_path):
    raise UserError(f"Karpathy split file not found: {json_path} (config data.karpathy_json)")
  if not image_root or not os.path.isdir(image_root):
    raise UserError(f"image folder not found: {image_root!r} (config data.image_root)")
  try:
    with open(json_path, encoding="utf-8") as f:
      content = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{json_path}: malformed JSON: {e.msg} at line {e.lineno} column "
                    f"{e.colno}") from e
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"{json_path}: cannot read: {e}") from e
  records = _require_key(content, "images", json_path, "the top-level object")
  if not isinstance(records, list):
    raise UserError(f"{json_path}: key 'images' must be a list, got {type(records).__name__}")

  out: dict[str, list[Entry]] = {split: [] for split in SPLITS}
  seen_ids: dict[int, int] = {}
  for i, record in enumerate(records):
    where = f"images[{i}]"
    filename = _require_key(record, "filename", json_path, where)
    raw_split = _require_key(record, "split", json_path, where)
    sentences = _require_key(record, "sentences", json_path, where)
    if raw_split not in SPLIT_NAMES:
      raise UserError(f"{json_path}: {where} has unknown split {raw_split!r} "
                      f"(expected one of {', '.join(SPLIT_NAMES)})")
    if not isinstance(sentences, list):
      raise UserError(f"{json_path}: {where}.sentences must be a list")
    captions = tuple(
        str(_require_key(s, "raw", json_path, f"{where}.sentences[{j}]")).strip()
        for j, s in enumerate(sentences))
    image_id = record.get("imgid", i)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
      raise UserError(f"{json_path}: {where}.imgid must be an integer, got {image_id!r}")
    if image_id in seen_ids:
      raise UserError(f"{json_path}: {where} repeats imgid {image_id} of "
                      f"images[{seen_ids[image_id]}]")
    seen_ids[image_id] = i
    filepath = str(record.get("filepath", "") or "")
    file_name = f"{filepath}/{filename}" if filepath else str(filename)
    out[SPLIT_NAMES[raw_split]].append(Entry(
        image_id=image_id, split=SPLIT_NAMES[raw_split], file_name=file_name,
        path=_resolve_path(image_root, filepath, str(filename)), captions=captions))
  return out


def describe_bad(paths: Sequence[str], total: int, what: str, show: int = 5) -> str:
  """"3 of 120 images are missing: a.jpg, b.jpg, c.jpg" (first `show` paths)."""
  first = ", ".join(paths[:show]) + (", ..." if len(paths) > show else "")
  return f"{len(paths)} of {total} images {what}: {first}"


def load_encoded(entries: Sequence[Entry], image_size: int, encoding: str, jpeg_quality: int,
                 num_threads: int) -> Iterator[tuple[Entry, bytes | None, str]]:
  """Yields `(entry, encoded bytes or None, error text)` in order, decoding in threads.

  PIL releases the GIL while decoding and resizing, so threads scale; entries are processed
  in bounded chunks so a slow consumer never holds more than a chunk of images in memory.
  """
  def work(entry: Entry):
    try:
      pixels = images_lib.load_resized(entry.path, image_size)
    except IMAGE_ERRORS as e:
      return entry, None, f"{type(e).__name__}: {e}"
    return entry, images_lib.encode(pixels, encoding, jpeg_quality), ""

  chunk = max(1, 16 * num_threads)
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    for start in range(0, len(entries), chunk):
      yield from pool.map(work, entries[start:start + chunk])
