"""Images given to `Retriever.add`, turned into exactly what the embed stage fed the encoder.

An image is a file path, encoded bytes (PNG, JPEG, WebP, GIF, BMP or SVG:
`images.FILE_FORMATS`), a PIL image, or pixels (`uint8 [H, W, 3]`, as the service's image
workers hand them over after decoding an upload out of process). It takes the same road as
an indexed image did: `prepare` (resize the shorter side to
`data.image_size`, centre crop, store as `data.image_encoding`), then `embed`
(`preprocess.resize_and_crop` to the encoder's crop). The store-and-decode round trip is kept
because a JPEG-storing config changes the pixels there.

Bad images are refused before anything changes, with `prepare`'s reasons:
"2 of 120 images cannot be used: a.svg: unsupported SVG: refers to '/etc/x.png' outside the
document (href); b.png: missing".
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from avg_jax.data import images as images_lib
from avg_jax.data import karpathy, svg
from avg_jax.encoders import preprocess
from avg_jax.errors import UserError


def describe(image: Any, position: int) -> str:
  """How an error names an image: its path, or its position in the call."""
  if isinstance(image, (str, os.PathLike)):
    return os.fspath(image)
  return f"image {position}"


def problem(image: Any) -> str:
  """Why `image` cannot be added ("" when it can)."""
  if isinstance(image, (str, os.PathLike)):
    return images_lib.check_file(os.fspath(image))
  if isinstance(image, (bytes, bytearray, memoryview)):
    return images_lib.check_bytes(bytes(image))
  if isinstance(image, Image.Image):
    return ""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.size:
      return f"pixels must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}"
    return ""
  return (
    f"expected a file path, encoded bytes, a PIL image or uint8 pixels, got {type(image).__name__}"
  )


def check_all(images: Sequence[Any]) -> None:
  """A `UserError` listing the images that cannot be added (as `prepare` words it)."""
  bad = [
    (describe(image, i), reason)
    for i, image in enumerate(images)
    for reason in [problem(image)]
    if reason
  ]
  if bad:
    raise UserError(karpathy.describe_bad(bad, len(images)))


def _resized(image: Any, size: int) -> np.ndarray:
  """`uint8 [size, size, 3]` as `prepare` makes it (SVGs drawn in a worker process)."""
  if isinstance(image, (str, os.PathLike)):
    return images_lib.load_resized(os.fspath(image), size)
  if isinstance(image, (bytes, bytearray, memoryview)):
    data = bytes(image)
    if svg.is_svg("", data[:1024]):
      pixels = images_lib.svg_in_worker(data, size)
      assert pixels is not None  # None only for a check alone (size 0)
      return pixels
    with images_lib.load(data) as pil:
      return images_lib.resize_center_crop(pil, size)
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  return images_lib.resize_center_crop(image, size)


def encoder_input(
  image: Any, *, image_size: int, encoding: str, jpeg_quality: int, pre: preprocess.PreprocessConfig
) -> tuple[np.ndarray, bytes]:
  """`(uint8[crop, crop, 3] for the image encoder, the image as prepare stored it)`."""
  pixels = _resized(image, image_size)
  stored = images_lib.encode(pixels, encoding, jpeg_quality)
  return preprocess.resize_and_crop(images_lib.decode(stored), pre), stored


def file_name(image: Any) -> str:
  """The name results show for an added image: a path's base name, else ""."""
  if isinstance(image, (str, os.PathLike)):
    return os.path.basename(os.fspath(image))
  return ""
