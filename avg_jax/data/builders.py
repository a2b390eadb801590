"""TFDS builders writing ArrayRecord: the generated `avg_shapes` and the Karpathy-split files.

No TensorFlow is needed: features are plain tensors and text (TFDS serialises them with
protobuf alone), images are stored as PNG/JPEG bytes that `avg_jax.data.dataset` decodes
with PIL. Records keep generation order (`disable_shuffling`), so record i is image i of
its split. Builders are not registered in TFDS's global registry (`skip_registration`).

Every element: `image_id` int64, `image` encoded bytes, `captions` (exactly C texts),
`file_name` text, `attributes` text (the scene JSON for avg_shapes, "" for real data).
"""

import contextlib
import dataclasses
import io
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from avg_jax.data import images as images_lib
from avg_jax.data import karpathy as karpathy_lib
from avg_jax.data import shapes as shapes_lib
from avg_jax.errors import UserError
from avg_jax.progress import progress

SPLITS = ("train", "val", "test")
DATASETS = ("avg_shapes", "karpathy")
_log = logging.getLogger(__name__)


def features(captions_per_image: int) -> tfds.features.FeaturesDict:
  """The record layout shared by both builders (see the module docstring)."""
  return tfds.features.FeaturesDict({
      "image_id": tfds.features.Scalar(np.int64),
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG / JPEG bytes
      "captions": tfds.features.Sequence(tfds.features.Text(), length=captions_per_image),
      "file_name": tfds.features.Text(),
      "attributes": tfds.features.Text(),
  })


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common base: no download checksums to look up."""

  VERSION = tfds.core.Version("1.0.0")

  # TFDS looks for a checksums file next to a builder's code; for a builder inside a package
  # (tfds 4.9.10) that lookup imports `importlib_resources`, which TFDS does not install on
  # Python >= 3.9. We download nothing, so there is no code path to search.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None


class AvgShapes(_Builder, skip_registration=True):
  """Generated shapes scenes with templated captions (avg_jax.data.shapes)."""

  def __init__(self, *, data_config: Any, data_dir: str):
    self._cfg = data_config
    super().__init__(data_dir=data_dir, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=features(int(self._cfg.captions_per_image)),
        disable_shuffling=True, description="avg_shapes: generated scenes with captions.")

  def _split_generators(self, dl_manager):
    del dl_manager
    sizes = {"train": self._cfg.num_train, "val": self._cfg.num_val, "test": self._cfg.num_test}
    first_ids = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}
    return {split: self._generate_examples(split, int(sizes[split]), first_ids[split])
            for split in SPLITS}

  def _generate_examples(self, split: str, num_images: int, first_id: int):
    cfg = self._cfg
    examples = shapes_lib.generate(
        split, num_images, int(cfg.image_size), int(cfg.generator_seed),
        int(cfg.captions_per_image), first_id=first_id)
    for ex in progress(examples, total=num_images, desc=f"avg_shapes {split}", unit="img"):
      yield ex["index"], {
          "image_id": ex["image_id"],
          "image": images_lib.encode(ex["image"], cfg.image_encoding, cfg.jpeg_quality),
          "captions": ex["captions"], "file_name": ex["file_name"],
          "attributes": ex["attributes"]}


class Karpathy(_Builder, skip_registration=True):
  """Flickr30K / MS-COCO from a Karpathy split JSON and an image folder.

  Images are resized (shorter side to `image_size`, bicubic) and centre-cropped to a square.
  `entries` are pre-checked (files exist, >= C captions; see `build`); images that fail to
  decode are left out and recorded in `self.bad` for `build` to report or skip.
  """

  def __init__(self, *, data_config: Any, data_dir: str,
               entries: dict[str, list[karpathy_lib.Entry]]):
    self._cfg = data_config
    self._entries = entries
    self.bad: list[tuple[str, str]] = []  # (path, reason)
    super().__init__(data_dir=data_dir, file_format="array_record")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=features(int(self._cfg.captions_per_image)),
        disable_shuffling=True, description="Karpathy-split image-caption dataset.")

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    cfg = self._cfg
    c = int(cfg.captions_per_image)
    entries = self._entries[split]
    loaded = karpathy_lib.load_encoded(entries, int(cfg.image_size), cfg.image_encoding,
                                       int(cfg.jpeg_quality),
                                       num_threads=min(32, os.cpu_count() or 1))
    for key, (entry, data, error) in enumerate(
        progress(loaded, total=len(entries), desc=f"karpathy {split}", unit="img")):
      if data is None:
        self.bad.append((entry.path, error))
        continue
      yield key, {"image_id": entry.image_id, "image": data, "captions": list(entry.captions[:c]),
                  "file_name": entry.file_name, "attributes": ""}


@dataclasses.dataclass
class BuildResult:
  builder_dir: str                 # .../<name>/<version>: what tfds.builder_from_directory reads
  num_images: dict[str, int]       # per split, after skipping
  skipped: list[tuple[str, str]]   # (path, reason) of skipped images


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's own progress bars and stdout banners (we show our own progress)."""
  utils = tfds.core.utils.tqdm_utils
  was_active = getattr(utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(was_active)


def _check_karpathy(config: Any) -> tuple[dict, list[tuple[str, str]]]:
  """Reads the JSON and pre-checks files and caption counts (cheap, before decoding)."""
  entries = karpathy_lib.read_entries(config.karpathy_json, config.image_root)
  c = int(config.captions_per_image)
  total = sum(len(v) for v in entries.values())
  missing = [e.path for v in entries.values() for e in v if not os.path.isfile(e.path)]
  short = [e.path for v in entries.values() for e in v if len(e.captions) < c]
  if not config.skip_bad_images:
    if missing:
      raise UserError(karpathy_lib.describe_bad(missing, total, "are missing") +
                      " (set data.skip_bad_images=True to skip them)")
    if short:
      raise UserError(karpathy_lib.describe_bad(
          short, total, f"have fewer than data.captions_per_image={c} captions") +
          f" in {config.karpathy_json} (lower data.captions_per_image or set "
          "data.skip_bad_images=True to skip them)")
  bad = ([(p, "missing") for p in missing] +
         [(p, f"fewer than {c} captions") for p in short])
  bad_paths = {p for p, _ in bad}
  kept = {split: [e for e in v if e.path not in bad_paths] for split, v in entries.items()}
  return kept, bad


def _corrupt_message(bad: list[tuple[str, str]], total: int) -> str:
  return (karpathy_lib.describe_bad([p for p, _ in bad], total, "are corrupt or unreadable") +
          f" ({bad[0][1]}; set data.skip_bad_images=True to skip them)")


def build(config: Any, data_dir: str) -> BuildResult:
  """Writes the dataset named by `config.name` (the `data` config section) as ArrayRecord
  files under `data_dir`; raises `UserError` for bad inputs (naming the file / key)."""
  if config.image_encoding not in images_lib.ENCODINGS:
    raise UserError(f"config data.image_encoding: {config.image_encoding!r} is not one of "
                    f"{', '.join(images_lib.ENCODINGS)}")
  if int(config.image_size) < 8:
    raise UserError(f"config data.image_size: {config.image_size} is too small (>= 8)")
  if int(config.captions_per_image) < 1:
    raise UserError(f"config data.captions_per_image: {config.captions_per_image} must be >= 1")
  if config.name == "avg_shapes":
    for split in SPLITS:
      if int(config[f"num_{split}"]) < 1:
        raise UserError(f"config data.num_{split}: must be >= 1, got {config[f'num_{split}']}")
    builder = AvgShapes(data_config=config, data_dir=data_dir)
    skipped, total = [], 0
  elif config.name == "karpathy":
    entries, skipped = _check_karpathy(config)
    total = sum(len(v) for v in entries.values()) + len(skipped)  # images in the JSON
    for split in SPLITS:
      if not entries[split]:
        raise UserError(f"{config.karpathy_json}: no usable images in split {split!r}")
    builder = Karpathy(data_config=config, data_dir=data_dir, entries=entries)
  else:
    raise UserError(f"config data.name: unknown dataset {config.name!r} "
                    f"(expected one of {', '.join(DATASETS)})")

  try:
    with _quiet_tfds():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  except Exception as e:  # a split whose images were all unreadable fails inside TFDS
    if isinstance(builder, Karpathy) and builder.bad:
      raise UserError(_corrupt_message(builder.bad, total)) from e
    raise

  if isinstance(builder, Karpathy):
    if builder.bad and not config.skip_bad_images:
      raise UserError(_corrupt_message(builder.bad, total))
    skipped = skipped + list(builder.bad)
    if skipped:
      _log.warning("%s; skipped them (data.skip_bad_images=True)", karpathy_lib.describe_bad(
          [p for p, _ in skipped], total, "are missing, corrupt or lack captions"))
  num_images = {split: int(builder.info.splits[split].num_examples) for split in SPLITS}
  return BuildResult(builder_dir=str(builder.data_dir), num_images=num_images, skipped=skipped)
