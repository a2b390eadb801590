"""Decoding images with PIL and resvg, in whatever process asks: the part an image worker runs.

`load` reads an image (a path or encoded bytes) in only the formats it is given (`FILE_FORMATS`,
`UPLOAD_FORMATS`, `STORED_FORMATS`), never PIL's other plugins (EPS / PS call Ghostscript);
`worker_job` is what `image_worker.py` runs on untrusted bytes. Policy (which checks run in a
worker process, with what budget) lives in `images.py`, which re-exports these names; this
module imports no worker, so a worker process imports it without a cycle.

Transparency: images with an alpha channel (RGBA, LA, PA, ...) or a transparent colour
(palette, grey or RGB PNGs with a tRNS chunk) are composited onto a white background
(`BACKGROUND`) when they become RGB; dropping the alpha instead would show whatever colour
data the transparent pixels happen to hold (often black). SVGs the same way.
"""

import io
import re

import numpy as np

# Registered here so that opening with `formats=` never makes PIL import all its plugins
# (`Image.init`, ~2 s on a busy machine): PNG, JPEG, GIF and BMP come with `Image.preinit`.
from PIL import (
  Image,
  WebPImagePlugin,  # noqa: F401
)

from avg_jax.data import svg as svg_lib

BACKGROUND = (255, 255, 255)  # what transparent pixels become (white)
# PIL format names; "SVG" is drawn by resvg, not PIL.
STORED_FORMATS = ("PNG", "JPEG")
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "SVG")
FILE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "SVG")
# SVGs in `prepare` / `index add`: drawn into at most this many pixels (4 000 x 4 000), and
# stopped after this long (the service has its own budgets: `avg-jax serve --help`).
SVG_MAX_PIXELS = 16_000_000
SVG_TIMEOUT_S = 60.0


class ImageProblem(ValueError):
  """Why an image cannot be used; the message is the reason a user sees ("missing",
  "too large (...)", ...)."""


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


def _formats_text(formats) -> str:
  names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
  return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _too_large(pixels: int, limit: int | None) -> str:
  if limit is None:  # PIL's own limit: set, since PIL raised DecompressionBombError
    pil_limit = Image.MAX_IMAGE_PIXELS
    return f"too large ({pixels} pixels; PIL refuses more than {2 * (pil_limit or 0)})"
  return f"too large ({pixels} pixels; the limit is {limit})"


def load(
  source,
  formats=FILE_FORMATS,
  *,
  max_pixels: int | None = None,
  min_side: int = 0,
  check_only: bool = False,
) -> Image.Image:
  """The image in `source` (a path or encoded bytes), fully decoded, in process; an
  `ImageProblem` naming why not. `formats`: what may be read (module doc); `max_pixels`: the
  pixel budget, checked on the header before any pixel is decoded (None: PIL's own limit,
  raster only; SVGs are then drawn into `SVG_MAX_PIXELS`); `min_side`: an SVG is drawn with
  this shorter side (0: `svg.CHECK_SIDE`); `check_only`: JPEGs are decoded at 1/8 scale, which
  reads every byte of the stream at a fraction of the cost (enough to find a truncated file)."""
  data = source if isinstance(source, (bytes, bytearray, memoryview)) else None
  head = bytes(data[:1024]) if data is not None else _head(source)
  if svg_lib.is_svg("" if data is not None else str(source), head):
    if "SVG" not in formats:
      raise ImageProblem("unsupported format (SVG)")
    if data is None:
      with open(source, "rb") as f:
        data = f.read(svg_lib.MAX_SVG_BYTES + 1)
    try:
      return svg_lib.rasterise(
        bytes(data),
        max_pixels=max_pixels or SVG_MAX_PIXELS,
        min_side=min_side or svg_lib.CHECK_SIDE,
      )
    except svg_lib.SvgProblem as e:
      raise ImageProblem(str(e)) from e
  raster = [f for f in formats if f != "SVG"]
  try:
    pil = Image.open(io.BytesIO(bytes(data)) if data is not None else source, formats=raster)
  except Image.UnidentifiedImageError as e:
    raise ImageProblem(f"not an image in a format avg-jax reads ({_formats_text(formats)})") from e
  except Image.DecompressionBombError as e:
    numbers = re.findall(r"\d+", str(e))  # "Image size (N pixels) exceeds limit of M pixels"
    raise ImageProblem(
      _too_large(int(numbers[0]), max_pixels) if numbers else f"too large ({e})"
    ) from e
  except Exception as e:  # pylint: disable=broad-except (PIL's parsers raise many kinds)
    raise ImageProblem(f"cannot decode ({type(e).__name__}: {e})") from e
  try:
    width, height = pil.size
    if max_pixels is not None and width * height > max_pixels:
      raise ImageProblem(_too_large(width * height, max_pixels))
    if check_only and pil.format == "JPEG":
      pil.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    pil.load()
  except ImageProblem:
    pil.close()
    raise
  except Exception as e:  # pylint: disable=broad-except
    pil.close()
    raise ImageProblem(f"cannot decode ({type(e).__name__}: {e})") from e
  return pil


def _head(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read(1024)


def worker_job(params: dict, data: bytes) -> np.ndarray | None:
  """What an image worker process runs (`image_worker.py`): the image in `data` checked
  against `params` ("formats", "max_pixels", "min_side") and, when `params["size"]` > 0,
  `resize_center_crop` to it (`uint8 [size, size, 3]`); None for a check alone."""
  size = int(params.get("size", 0))
  pil = load(
    bytes(data),
    tuple(params["formats"]),
    max_pixels=params.get("max_pixels"),
    min_side=int(params.get("min_side", 0)) or size,
    check_only=not size,
  )
  try:
    return resize_center_crop(pil, size) if size else None
  finally:
    pil.close()
