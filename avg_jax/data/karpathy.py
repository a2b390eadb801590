"""Reading a Karpathy-split JSON (Flickr30K, MS-COCO) into per-split image entries.

Format (docs/design.md): `{"images": [{"filename", "filepath" (COCO), "imgid", "split",
"sentences": [{"raw": ...}, ...]}, ...]}`. `restval` joins `train`. An image lives at
`<image_root>/<filepath>/<filename>` or, when that does not exist (or there is no filepath),
`<image_root>/<filename>`. The builder follows the format, not the published counts.
"""

import concurrent.futures
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence

from PIL import Image

from avg_jax.data import images as images_lib
from avg_jax.errors import UserError
from avg_jax.progress import progress

SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}
SPLITS = ("train", "val", "test")
# Errors PIL raises on missing, truncated or non-image files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Entry:
  image_id: int  # "imgid" (the image's index in the file when absent)
  split: str  # train | val | test
  file_name: str  # "<filepath>/<filename>" or "<filename>"
  path: str  # resolved image path (may not exist)
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


def _first_undecodable(value, where: str) -> str | None:
  """Path (e.g. "sentences[1].raw") of the first string in `value` holding a byte that was
  not UTF-8 (decoded as a lone surrogate), or None."""
  if isinstance(value, str):
    return where if any("\udc80" <= ch <= "\udcff" for ch in value) else None
  items = (
    value.items()
    if isinstance(value, dict)
    else enumerate(value)
    if isinstance(value, list)
    else ()
  )
  for key, item in items:
    found = _first_undecodable(
      item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"
    )
    if found:
      return found
  return None


def _json_error(json_path: str, e: json.JSONDecodeError) -> UserError:
  # Several of json's messages end in "at" ("Unterminated string starting at").
  where = f"line {e.lineno} column {e.colno}"
  text = f"{e.msg} {where}" if e.msg.endswith(" at") else f"{e.msg} at {where}"
  return UserError(f"{json_path}: malformed JSON: {text}")


def _load_json(json_path: str):
  """The parsed file; a byte that is not UTF-8 is an error naming the image entry (index)
  that holds it, or its line when it is outside every entry."""
  try:
    with open(json_path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise UserError(f"{json_path}: cannot read: {e.strerror or e}") from e
  try:
    text, bad = raw.decode("utf-8-sig"), None
  except UnicodeDecodeError as e:
    # Parse anyway (bad bytes become lone surrogates) to say which entry holds the byte.
    text, bad = raw.decode("utf-8-sig", errors="surrogateescape"), e
  where = ""
  if bad is not None:
    line = raw.count(b"\n", 0, bad.start) + 1
    hint = " (UTF-16? save it as UTF-8)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
    where = (
      f"byte 0x{raw[bad.start]:02x} at offset {bad.start} (line {line}) is not valid UTF-8{hint}"
    )
  try:
    content = json.loads(text)
  except json.JSONDecodeError as e:
    if bad is not None:
      raise UserError(f"{json_path}: {where}") from bad
    raise _json_error(json_path, e) from e
  if bad is not None:
    records = content.get("images") if isinstance(content, dict) else None
    for i, record in enumerate(records if isinstance(records, list) else []):
      found = _first_undecodable(record, f"images[{i}]")
      if found:
        raise UserError(f"{json_path}: {found}: {where}") from bad
    raise UserError(f"{json_path}: {where}") from bad
  return content


def read_entries(json_path: str, image_root: str) -> dict[str, list[Entry]]:
  """Parses and validates the JSON; returns `{split: [Entry, ...]}` in file order.

  Raises `UserError` naming the file (and key / image index) for unreadable or malformed
  files, bytes that are not UTF-8, missing keys, unknown split names and duplicate image ids.
  """
  if not json_path:
    raise UserError(
      "config data.karpathy_json is empty: give the Karpathy split JSON "
      "(e.g. --config.data.karpathy_json=/data/dataset_flickr30k.json)"
    )
  if not os.path.isfile(json_path):
    raise UserError(f"Karpathy split file not found: {json_path} (config data.karpathy_json)")
  if not image_root or not os.path.isdir(image_root):
    raise UserError(f"image folder not found: {image_root!r} (config data.image_root)")
  content = _load_json(json_path)
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
      raise UserError(
        f"{json_path}: {where} has unknown split {raw_split!r} "
        f"(expected one of {', '.join(SPLIT_NAMES)})"
      )
    if not isinstance(sentences, list):
      raise UserError(f"{json_path}: {where}.sentences must be a list")
    captions = tuple(
      str(_require_key(s, "raw", json_path, f"{where}.sentences[{j}]")).strip()
      for j, s in enumerate(sentences)
    )
    image_id = record.get("imgid", i)
    if not isinstance(image_id, int) or isinstance(image_id, bool):
      raise UserError(f"{json_path}: {where}.imgid must be an integer, got {image_id!r}")
    if image_id in seen_ids:
      raise UserError(
        f"{json_path}: {where} repeats imgid {image_id} of images[{seen_ids[image_id]}]"
      )
    seen_ids[image_id] = i
    filepath = str(record.get("filepath", "") or "")
    file_name = f"{filepath}/{filename}" if filepath else str(filename)
    out[SPLIT_NAMES[raw_split]].append(
      Entry(
        image_id=image_id,
        split=SPLIT_NAMES[raw_split],
        file_name=file_name,
        path=_resolve_path(image_root, filepath, str(filename)),
        captions=captions,
      )
    )
  return out


def describe_bad(
  bad: Sequence[tuple[str, str]], total: int, what: str = "cannot be used", show: int = 5
) -> str:
  """ "2 of 120 images cannot be used: a.svg: unsupported format (SVG); b.png: missing": each
  of the first `show` `(path, reason)` pairs with its own reason."""
  items = "; ".join(f"{path}: {reason}" for path, reason in bad[:show])
  more = f"; and {len(bad) - show} more" if len(bad) > show else ""
  return f"{len(bad)} of {total} images {what}: {items}{more}"


def find_bad(
  entries: dict[str, list[Entry]], captions_per_image: int, num_threads: int
) -> list[tuple[str, str]]:
  """`(path, reason)` of every entry prepare cannot use, in split and file order: missing or
  unreadable files (`images.check_file` decodes each one, in threads), too few captions."""
  flat = [e for split in SPLITS for e in entries[split]]
  chunk = max(1, 16 * num_threads)
  reasons = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
    checked = (
      r
      for start in range(0, len(flat), chunk)
      for r in pool.map(lambda e: images_lib.check_file(e.path), flat[start : start + chunk])
    )
    for entry, reason in zip(
      flat, progress(checked, total=len(flat), unit="img", desc="checking images")
    ):
      if not reason and len(entry.captions) < captions_per_image:
        reason = (
          f"{len(entry.captions)} caption(s), data.captions_per_image is {captions_per_image}"
        )
      if reason:
        reasons.append((entry.path, reason))
  return reasons


def load_encoded(
  entries: Sequence[Entry], image_size: int, encoding: str, jpeg_quality: int, num_threads: int
) -> Iterator[tuple[Entry, bytes | None, str]]:
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
      yield from pool.map(work, entries[start : start + chunk])
