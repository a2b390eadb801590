"""Image bytes <-> arrays with PIL (no TensorFlow): encoding for storage, decoding for reading.

Images are stored encoded (PNG: lossless, the default; JPEG: ~5x smaller for photos) and
decoded by the pipeline, which is the "decode" in the data benchmark.

Formats: PIL is only ever asked for the formats avg-jax means to read (`FILE_FORMATS` for
`prepare` and `index add`, `UPLOAD_FORMATS` for the service, `STORED_FORMATS` for what
`prepare` wrote), never for the rest of its plugins: EPS / PS call Ghostscript, an outside
program with no time limit. SVG is drawn by resvg (`svg.py`) in a worker process with a time
budget (`image_worker.py`), since a drawing can be made arbitrarily slow. The decoding itself
(`load`, `to_rgb`, `resize_center_crop`, `worker_job`, `ImageProblem`) is in
`image_decode.py`, which a worker imports; its names are re-exported here.
"""

import io

import numpy as np
from PIL import Image

from avg_jax.data import svg as svg_lib
from avg_jax.data.image_decode import (  # noqa: F401 (re-exported)
  BACKGROUND,
  FILE_FORMATS,
  STORED_FORMATS,
  SVG_MAX_PIXELS,
  SVG_TIMEOUT_S,
  UPLOAD_FORMATS,
  ImageProblem,
  _head,
  load,
  resize_center_crop,
  to_rgb,
  worker_job,
)

ENCODINGS = ("png", "jpeg")


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


def decode(data: bytes) -> np.ndarray:
  """PNG/JPEG bytes -> `uint8 [H, W, 3]` (grey and palette images become RGB, transparent
  pixels white)."""
  with Image.open(io.BytesIO(data), formats=STORED_FORMATS) as pil:
    return np.asarray(to_rgb(pil), np.uint8)


def _read_svg(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read(svg_lib.MAX_SVG_BYTES + 1)


def svg_in_worker(data: bytes, size: int) -> np.ndarray | None:
  """`worker_job` for an SVG in the shared worker pool (time budget `SVG_TIMEOUT_S`)."""
  from avg_jax.data import image_worker  # a process pool: started on the first SVG only

  return image_worker.shared_pool().run(
    {"formats": list(FILE_FORMATS), "max_pixels": SVG_MAX_PIXELS, "size": size},
    data,
    timeout=SVG_TIMEOUT_S,
  )


def load_resized(path: str, size: int) -> np.ndarray:
  """Reads an image file fully -> `uint8 [size, size, 3]`; an `ImageProblem` when it cannot
  be used (truncated, corrupt, a format avg-jax does not read). SVGs are drawn in a worker
  process with a time budget."""
  if svg_lib.is_svg(path, _head(path)):
    pixels = svg_in_worker(_read_svg(path), size)
    assert pixels is not None  # None only for a check alone (size 0)
    return pixels
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
