"""Image bytes <-> arrays with PIL (no TensorFlow): encoding for storage, decoding for reading.

Images are stored encoded (PNG: lossless, the default; JPEG: ~5x smaller for photos) and
decoded by the pipeline, which is the "decode" in the data benchmark.

Transparency: images with an alpha channel (RGBA, LA, PA, ...) or a transparent colour
(palette, grey or RGB PNGs with a tRNS chunk) are composited onto a white background
(`BACKGROUND`) when they become RGB; dropping the alpha instead would show whatever colour
data the transparent pixels happen to hold (often black).
"""

import io
import re

import numpy as np
from PIL import Image

ENCODINGS = ("png", "jpeg")
BACKGROUND = (255, 255, 255)  # what transparent pixels become (white)
_SVG_SUFFIXES = (".svg", ".svgz")


def encode(image: np.ndarray, encoding: str = "png", jpeg_quality: int = 95) -> bytes:
  """`uint8 [H, W, 3]` -> PNG or JPEG bytes (deterministic for a given image)."""
  buffer = io.BytesIO()
  pil = Image.fromarray(np.asarray(image, np.uint8))
  if encoding == "png":
    pil.save(buffer, format="PNG", compress_level=6)
  elif encoding == "jpeg":
    pil.save(buffer, format="JPEG", quality=int(jpeg_quality))
  else:
    raise ValueError(f"unknown image encoding {encoding!r} (expected one of {ENCODINGS})")
  return buffer.getvalue()


def to_rgb(pil: Image.Image) -> Image.Image:
  """An RGB image; transparent pixels are composited onto `BACKGROUND` (white).

  Going through RGBA also keeps PIL from warning about palette transparency on stderr."""
  if pil.mode == "RGB" and "transparency" not in pil.info:
    return pil
  if "transparency" in pil.info or any(band in ("A", "a") for band in pil.getbands()):
    rgba = pil.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return pil.convert("RGB")


def decode(data: bytes) -> np.ndarray:
  """PNG/JPEG bytes -> `uint8 [H, W, 3]` (grey and palette images become RGB, transparent
  pixels white)."""
  with Image.open(io.BytesIO(data)) as pil:
    return np.asarray(to_rgb(pil), np.uint8)


def resize_center_crop(pil: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic), then crops the centre `size x size`.

  This keeps the aspect ratio (no distortion) and the middle of the picture, as CLIP's
  preprocessing does; transparent pixels become white (`to_rgb`); returns
  `uint8 [size, size, 3]`.
  """
  pil = to_rgb(pil)
  w, h = pil.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


def load_resized(path: str, size: int) -> np.ndarray:
  """Reads an image file fully (raising on truncated/corrupt data) -> `uint8 [size, size, 3]`."""
  with Image.open(path) as pil:
    pil.load()  # forces a full decode: a truncated file fails here, not later
    return resize_center_crop(pil, size)


def _is_svg(path: str, head: bytes) -> bool:
  if path.lower().endswith(_SVG_SUFFIXES):
    return True
  text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
  return text.startswith(b"<svg") or (text.startswith((b"<?xml", b"<!doctype svg"))
                                      and b"<svg" in text)


def check_file(path: str) -> str:
  """Why the image file at `path` cannot be used ("" when it can): "missing", "empty file
  (0 bytes)", "unsupported format (SVG)", "not an image file PIL can read", "too large (...)",
  "cannot read (...)" or "cannot decode (...)".

  The whole file is decoded, as `load_resized` will (JPEGs at 1/8 scale, which reads every
  byte of the stream at a fraction of the cost), so a truncated or corrupt file fails here.
  """
  try:
    with open(path, "rb") as f:
      head = f.read(1024)
  except FileNotFoundError:
    return "missing"
  except OSError as e:
    return f"cannot read ({e.strerror or type(e).__name__})"
  if not head:
    return "empty file (0 bytes)"
  if _is_svg(path, head):
    return "unsupported format (SVG)"
  return _decode_problem(path)


def check_bytes(data: bytes) -> str:
  """`check_file` for an encoded image held in memory ("" when it can be used)."""
  if not data:
    return "empty (0 bytes)"
  if _is_svg("", bytes(data[:1024])):
    return "unsupported format (SVG)"
  return _decode_problem(io.BytesIO(data))


def _decode_problem(source) -> str:
  """Why `source` (a path or a binary stream) does not decode whole ("" when it does)."""
  try:
    with Image.open(source) as pil:
      if pil.format == "JPEG":
        pil.draft("RGB", (max(1, pil.size[0] // 8), max(1, pil.size[1] // 8)))
      pil.load()
  except Image.UnidentifiedImageError:
    return "not an image file PIL can read"
  except Image.DecompressionBombError as e:
    numbers = re.findall(r"\d+", str(e))  # "Image size (N pixels) exceeds limit of M pixels"
    return (f"too large ({numbers[0]} pixels; PIL refuses more than {numbers[1]})"
            if len(numbers) >= 2 else f"too large ({e})")
  except Exception as e:  # pylint: disable=broad-except (PIL's parsers raise many kinds)
    return f"cannot decode ({type(e).__name__}: {e})"
  return ""
