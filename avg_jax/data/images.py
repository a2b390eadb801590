"""Image bytes <-> arrays with PIL (no TensorFlow): encoding for storage, decoding for reading.

Images are stored encoded (PNG: lossless, the default; JPEG: ~5x smaller for photos) and
decoded by the pipeline, which is the "decode" in the data benchmark.

Formats: PIL is only ever asked for the formats avg-jax means to read (`FILE_FORMATS` for
`prepare` and `index add`, `UPLOAD_FORMATS` for the service, `STORED_FORMATS` for what
`prepare` wrote), never for the rest of its plugins: EPS / PS call Ghostscript, an outside
program with no time limit. SVG is drawn by resvg (`svg.py`) in a worker process with a time
budget (`image_worker.py`), since a drawing can be made arbitrarily slow.

Transparency: images with an alpha channel (RGBA, LA, PA, ...) or a transparent colour
(palette, grey or RGB PNGs with a tRNS chunk) are composited onto a white background
(`BACKGROUND`) when they become RGB; dropping the alpha instead would show whatever colour
data the transparent pixels happen to hold (often black). SVGs the same way.
"""

import io
import re

import numpy as np
from PIL import Image
# Registered here so that opening with `formats=` never makes PIL import all its plugins
# (`Image.init`, ~2 s on a busy machine): PNG, JPEG, GIF and BMP come with `Image.preinit`.
from PIL import WebPImagePlugin  # noqa: F401

from avg_jax.data import svg as svg_lib

ENCODINGS = ("png", "jpeg")
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
  with Image.open(io.BytesIO(data), formats=STORED_FORMATS) as pil:
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


def _formats_text(formats) -> str:
  names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
  return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _too_large(pixels: int, limit: int | None) -> str:
  if limit is None:
    return f"too large ({pixels} pixels; PIL refuses more than {2 * Image.MAX_IMAGE_PIXELS})"
  return f"too large ({pixels} pixels; the limit is {limit})"


def load(source, formats=FILE_FORMATS, *, max_pixels: int | None = None, min_side: int = 0,
         check_only: bool = False) -> Image.Image:
  """The image in `source` (a path or encoded bytes), fully decoded, in process; an
  `ImageProblem` naming why not. `formats`: what may be read (module doc); `max_pixels`: the
  pixel budget, checked on the header before any pixel is decoded (None: PIL's own limit,
  raster only; SVGs are then drawn into `SVG_MAX_PIXELS`); `min_side`: an SVG is drawn with
  this shorter side (0: `svg.CHECK_SIDE`); `check_only`: JPEGs are decoded at 1/8 scale, which reads every
  byte of the stream at a fraction of the cost (enough to find a truncated file)."""
  data = source if isinstance(source, (bytes, bytearray, memoryview)) else None
  head = bytes(data[:1024]) if data is not None else _head(source)
  if svg_lib.is_svg("" if data is not None else str(source), head):
    if "SVG" not in formats:
      raise ImageProblem("unsupported format (SVG)")
    if data is None:
      with open(source, "rb") as f:
        data = f.read(svg_lib.MAX_SVG_BYTES + 1)
    try:
      return svg_lib.rasterise(bytes(data), max_pixels=max_pixels or SVG_MAX_PIXELS,
                               min_side=min_side or svg_lib.CHECK_SIDE)
    except svg_lib.SvgProblem as e:
      raise ImageProblem(str(e)) from e
  raster = [f for f in formats if f != "SVG"]
  try:
    pil = Image.open(io.BytesIO(bytes(data)) if data is not None else source, formats=raster)
  except Image.UnidentifiedImageError as e:
    raise ImageProblem(f"not an image in a format avg-jax reads ({_formats_text(formats)})"
                       ) from e
  except Image.DecompressionBombError as e:
    numbers = re.findall(r"\d+", str(e))  # "Image size (N pixels) exceeds limit of M pixels"
    raise ImageProblem(_too_large(int(numbers[0]), max_pixels) if numbers
                       else f"too large ({e})") from e
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
  pil = load(bytes(data), tuple(params["formats"]), max_pixels=params.get("max_pixels"),
             min_side=int(params.get("min_side", 0)) or size, check_only=not size)
  try:
    return resize_center_crop(pil, size) if size else None
  finally:
    pil.close()


def _read_svg(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read(svg_lib.MAX_SVG_BYTES + 1)


def svg_in_worker(data: bytes, size: int) -> np.ndarray | None:
  """`worker_job` for an SVG in the shared worker pool (time budget `SVG_TIMEOUT_S`)."""
  from avg_jax.data import image_worker  # a process pool: started on the first SVG only
  return image_worker.shared_pool().run(
      {"formats": list(FILE_FORMATS), "max_pixels": SVG_MAX_PIXELS, "size": size}, data,
      timeout=SVG_TIMEOUT_S)


def load_resized(path: str, size: int) -> np.ndarray:
  """Reads an image file fully -> `uint8 [size, size, 3]`; an `ImageProblem` when it cannot
  be used (truncated, corrupt, a format avg-jax does not read). SVGs are drawn in a worker
  process with a time budget."""
  if svg_lib.is_svg(path, _head(path)):
    return svg_in_worker(_read_svg(path), size)
  # PIL's own errors (UnidentifiedImageError, OSError: truncated) reach the caller, which
  # names the file with them.
  with Image.open(path, formats=[f for f in FILE_FORMATS if f != "SVG"]) as pil:
    pil.load()  # forces a full decode: a truncated file fails here, not later
    return resize_center_crop(pil, size)


def check_file(path: str) -> str:
  """Why the image file at `path` cannot be used ("" when it can): "missing", "empty file
  (0 bytes)", "not an image in a format avg-jax reads (...)", "too large (...)", "cannot read
  (...)", "cannot decode (...)", "unsupported SVG: ..." or "took longer than ...".

  The whole file is decoded, as `load_resized` will (module doc), so a truncated or corrupt
  file fails here; an SVG is drawn (in a worker process, with a time budget).
  """
  try:
    head = _head(path)
  except FileNotFoundError:
    return "missing"
  except OSError as e:
    return f"cannot read ({e.strerror or type(e).__name__})"
  if not head:
    return "empty file (0 bytes)"
  try:
    if svg_lib.is_svg(path, head):
      svg_in_worker(_read_svg(path), 0)
    else:
      load(path, check_only=True).close()
  except ImageProblem as e:
    return str(e)
  except OSError as e:
    return f"cannot read ({e.strerror or type(e).__name__})"
  return ""


def check_bytes(data: bytes, formats=FILE_FORMATS) -> str:
  """`check_file` for an encoded image held in memory ("" when it can be used); in process
  (the service decodes uploads in its worker processes instead)."""
  if not data:
    return "empty (0 bytes)"
  try:
    if svg_lib.is_svg("", bytes(data[:1024])) and "SVG" in formats:
      svg_in_worker(bytes(data), 0)
    else:
      load(bytes(data), formats, check_only=True).close()
  except ImageProblem as e:
    return str(e)
  return ""
