"""What a person sees of the indexed images: thumbnails and captions, stored in the export.

    <export>/gallery/index.json      {"format": "avg-jax-gallery", "version": 1,
                                      "thumbnail_size": S, "images": [{"image_id", "file_name",
                                      "captions": [...], "offset", "length", "type"}, ...]}
    <export>/gallery/thumbnails.bin  the thumbnails' encoded bytes, back to back

The thumbnails are copies, not a path map to the originals: an export is one self-contained
folder that can be copied to a serving machine without the dataset (5 000 COCO thumbnails of
256 px are ~60 MB). An image whose longer side is at most S keeps its original PNG/JPEG bytes;
a larger one is shrunk to S (aspect kept) and stored as JPEG (quality 85). An image that does
not decode gets no thumbnail (`length` 0). The gallery is optional: exports written before it
existed, or with `export.thumbnail_size=0`, load without one (`read` returns None).
"""

import io
import json
import mmap
import os
from collections.abc import Iterable
from typing import NamedTuple

from PIL import Image

from avg_jax.artifacts import io as artifact_io
from avg_jax.errors import UserError

DIRECTORY = "gallery"
INDEX = "index.json"
THUMBNAILS = "thumbnails.bin"
FORMAT = "avg-jax-gallery"
VERSION = 1
_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg"}


class Entry(NamedTuple):
  image_id: int
  file_name: str
  captions: list[str]
  image: bytes  # the original encoded image (PNG/JPEG), b"" when unknown


def thumbnail(data: bytes, size: int) -> tuple[bytes, str]:
  """`(encoded bytes, MIME type)` of the thumbnail of one encoded image; `(b"", "")` when it
  does not decode."""
  try:
    # Only what `prepare` stores: the gallery never runs PIL's other plugins.
    with Image.open(io.BytesIO(data), formats=list(_TYPES)) as pil:
      pil.load()
      if max(pil.size) <= size and pil.format in _TYPES:
        return data, _TYPES[pil.format]
      small = pil.convert("RGB")
      small.thumbnail((size, size), Image.Resampling.LANCZOS)
  except (OSError, ValueError, Image.DecompressionBombError):
    return b"", ""
  buffer = io.BytesIO()
  small.save(buffer, format="JPEG", quality=85)
  return buffer.getvalue(), "image/jpeg"


def write(export_dir: str, entries: Iterable[Entry], thumbnail_size: int) -> None:
  """Writes `<export_dir>/gallery/` (the caller makes the export folder atomic)."""
  directory = os.path.join(export_dir, DIRECTORY)
  os.makedirs(directory, exist_ok=True)
  images, offset = [], 0
  with open(os.path.join(directory, THUMBNAILS), "wb") as f:
    for e in entries:
      data, mime = thumbnail(e.image, thumbnail_size) if e.image else (b"", "")
      f.write(data)
      images.append(
        {
          "image_id": int(e.image_id),
          "file_name": str(e.file_name),
          "captions": [str(c) for c in e.captions],
          "offset": offset,
          "length": len(data),
          "type": mime,
        }
      )
      offset += len(data)
  artifact_io.write_json(
    os.path.join(directory, INDEX),
    {"format": FORMAT, "version": VERSION, "thumbnail_size": int(thumbnail_size), "images": images},
    ensure_ascii=False,
    indent=None,
  )


class Gallery:
  """Read side: captions and thumbnail bytes by image id (thread-safe reads of one mmap)."""

  def __init__(self, index: dict, thumbnails: bytes | mmap.mmap):
    self.thumbnail_size = int(index["thumbnail_size"])
    self._images = {int(i["image_id"]): i for i in index["images"]}
    self._data = thumbnails

  def __contains__(self, image_id: int) -> bool:
    return int(image_id) in self._images

  def has_thumbnail(self, image_id: int) -> bool:
    entry = self._images.get(int(image_id))
    return bool(entry and entry["length"])

  def captions(self, image_id: int) -> list[str]:
    entry = self._images.get(int(image_id))
    return list(entry["captions"]) if entry else []

  def thumbnail(self, image_id: int) -> tuple[bytes, str] | None:
    """`(bytes, MIME type)`, or None for an unknown image or one without a thumbnail."""
    entry = self._images.get(int(image_id))
    if not entry or not entry["length"]:
      return None
    start = int(entry["offset"])
    return bytes(self._data[start : start + int(entry["length"])]), entry["type"]


def read(export_dir: str) -> Gallery | None:
  """The export's gallery, or None when it has none; a damaged one is a `UserError`."""
  directory = os.path.join(export_dir, DIRECTORY)
  index_path = os.path.join(directory, INDEX)
  if not os.path.isfile(index_path):
    return None
  try:
    with open(index_path, encoding="utf-8") as f:
      index = json.load(f)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
      raise ValueError(f"not a version {VERSION} {FORMAT} index")
    end = max((int(i["offset"]) + int(i["length"]) for i in index["images"]), default=0)
    with open(os.path.join(directory, THUMBNAILS), "rb") as f:
      size = os.fstat(f.fileno()).st_size
      if size < end:
        raise ValueError(f"{THUMBNAILS} holds {size} bytes, the index needs {end}")
      data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
  except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise UserError(f"{directory}: unreadable gallery ({e})") from e
  return Gallery(index, data)
