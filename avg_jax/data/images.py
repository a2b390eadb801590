"""Image bytes <-> arrays with PIL (no TensorFlow): encoding for storage, decoding for reading.

Images are stored encoded (PNG: lossless, the default; JPEG: ~5x smaller for photos) and
decoded by the pipeline, which is the "decode" in the data benchmark.
"""

import io

import numpy as np
from PIL import Image

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
  """PNG/JPEG bytes -> `uint8 [H, W, 3]` (grey, palette and alpha images become RGB)."""
  with Image.open(io.BytesIO(data)) as pil:
    return np.asarray(pil.convert("RGB"), np.uint8)


def resize_center_crop(pil: Image.Image, size: int) -> np.ndarray:
  """Resizes the shorter side to `size` (bicubic), then crops the centre `size x size`.

  This keeps the aspect ratio (no distortion) and the middle of the picture, as CLIP's
  preprocessing does; returns `uint8 [size, size, 3]`.
  """
  pil = pil.convert("RGB")
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
