"""CLIP image preprocessing: resize the shortest side (bicubic), centre crop, mean/std.

The geometric part runs on the host per image with PIL (it matches Hugging Face
`CLIPImageProcessor`, which also resizes with PIL, bit for bit) and returns uint8, so batches
travel to the device as bytes; normalisation runs on the device inside the jitted encoder.
"""

import dataclasses
import json
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from avg_jax.errors import UserError

# OpenAI CLIP's pixel statistics (also the defaults of CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  resize_short: int  # target length of the shorter side
  crop_size: int  # square centre crop (= the model's image_size)
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d) -> "PreprocessConfig":
    return cls(int(d["resize_short"]), int(d["crop_size"]), tuple(d["mean"]), tuple(d["std"]))

  @classmethod
  def for_image_size(cls, image_size: int) -> "PreprocessConfig":
    return cls(image_size, image_size)

  @classmethod
  def from_hf_dir(cls, path: str, image_size: int) -> "PreprocessConfig":
    """Reads `preprocessor_config.json` when the directory has one, else CLIP's defaults."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(file):
      return cls.for_image_size(image_size)
    try:
      with open(file, encoding="utf-8") as f:
        d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise UserError(f"{file}: cannot read: {e}") from e
    size = d.get("size", image_size)
    size = size.get("shortest_edge", image_size) if isinstance(size, dict) else size
    crop = d.get("crop_size", image_size)
    crop = crop.get("height", image_size) if isinstance(crop, dict) else crop
    if int(crop) != image_size:
      raise UserError(f"{file}: crop_size {crop} differs from the model's image_size {image_size}")
    return cls(
      int(size),
      int(crop),
      tuple(d.get("image_mean", CLIP_MEAN)),
      tuple(d.get("image_std", CLIP_STD)),
    )


def resized_shape(height: int, width: int, short: int) -> tuple[int, int]:
  """(new_height, new_width) with the shorter side `short` (HF/torchvision rounding: floor)."""
  if width <= height:
    return int(short * height / width), short
  return short, int(short * width / height)


def resize_and_crop(image: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
  """`uint8[H, W, 3]` (or `[H, W]` grey) -> `uint8[crop, crop, 3]`."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  image = image[..., :3]
  height, width = image.shape[:2]
  new_h, new_w = resized_shape(height, width, cfg.resize_short)
  if (new_h, new_w) != (height, width):
    pil = Image.fromarray(image.astype(np.uint8), mode="RGB")
    image = np.asarray(pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    height, width = new_h, new_w
  crop = cfg.crop_size
  if height < crop or width < crop:
    # Only reachable when resize_short < crop_size: pad with zeros like HF's center_crop.
    padded = np.zeros((max(height, crop), max(width, crop), 3), np.uint8)
    top, left = (padded.shape[0] - height + 1) // 2, (padded.shape[1] - width + 1) // 2
    padded[top : top + height, left : left + width] = image
    image, height, width = padded, padded.shape[0], padded.shape[1]
  top, left = (height - crop) // 2, (width - crop) // 2
  return np.ascontiguousarray(image[top : top + crop, left : left + crop])


def normalize(images, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
  """`uint8[..., H, W, 3]` -> `float32[..., H, W, 3]`: (x / 255 - mean) / std (jnp, jittable)."""
  x = jnp.asarray(images).astype(jnp.float32) * jnp.float32(1 / 255)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
