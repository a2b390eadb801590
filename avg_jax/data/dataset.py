"""Reading prepared data: dataset info, random-access image and caption sources (grain).

    info = load_info(workdir)            # paths.dataset_info_file: counts, sizes, name, ...
    images = image_source(workdir, "test")
    images[3] -> {"image_id": int64, "image": uint8[H, W, 3], "captions": [C str],
                  "file_name": str, "attributes": str}
    captions = caption_source(workdir, "test")   # element i: caption i % C of image i // C
    captions[7] -> {"image_id": int64, "caption_index": int64, "caption": str}

Sources are `grain.MapDataset`s over the TFDS ArrayRecord files (no TensorFlow); they pickle,
so `pipeline.batch_iterator` can read them in worker processes.
"""

import json
import os
from typing import Any

import grain
import numpy as np

from avg_jax.artifacts import checksums, paths
from avg_jax.data import images as images_lib
from avg_jax.errors import UserError

SPLITS = ("train", "val", "test")
_REMEDY = "rerun `avg-jax prepare` (it rewrites it)"


def load_info(workdir: str) -> dict:
  """The prepared dataset's `dataset_info.json` (raises `UserError` when absent)."""
  path = paths.dataset_info_file(workdir)
  if not os.path.isfile(path):
    raise UserError(
      f"no prepared data: {path} not found (run `avg-jax prepare` with this --workdir first)"
    )
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, OSError) as e:
    raise UserError(f"{path}: unreadable dataset info ({e}); rerun `avg-jax prepare`") from e


def _check_split(info: dict, split: str, workdir: str) -> None:
  if split not in info["splits"]:
    raise UserError(
      f"unknown split {split!r} in {paths.prepared_dir(workdir)} (has {', '.join(info['splits'])})"
    )


def records_in(builder_dir: str, split: str) -> Any:
  """The raw TFDS data source of one split of the builder written in `builder_dir`."""
  # Imported here: TFDS takes ~0.2 s to import, and `search`, `serve` and `index` reach this
  # module (through the encoders) without reading a prepared dataset.
  import tensorflow_datasets as tfds

  return tfds.builder_from_directory(builder_dir).as_data_source(split)


def check_files(workdir: str, info: dict) -> None:
  """Every file `prepare` wrote is there with the size it was written with: a truncated
  ArrayRecord file otherwise fails deep inside grain's readers (a Riegeli RuntimeError).
  Sizes only (a stat per file), so opening a source stays cheap."""
  out_dir = paths.prepared_dir(workdir)
  for rel, size in sorted(info.get("files", {}).items()):
    path = os.path.join(out_dir, rel)
    if not os.path.isfile(path):
      raise UserError(f"{path} is missing; {_REMEDY}")
    if os.path.getsize(path) != size:
      raise UserError(
        f"{path} has {os.path.getsize(path)} bytes, {size} were written (damaged); {_REMEDY}"
      )


def check_contents(workdir: str, names) -> None:
  """The prepared files `names` (relative to the folder) hold the bytes `prepare` wrote
  (checksums.json): bytes changed in place keep the size and would otherwise load as other
  images or fail deep inside the readers (`UserError` naming the file)."""
  problem = checksums.check(paths.prepared_dir(workdir), *names)
  if problem:
    raise UserError(f"{problem}; {_REMEDY}")


def _split_files(info: dict, split: str) -> list[str]:
  """The files a reader of `split` opens: its ArrayRecord files and the small metadata
  files beside them (never another split's records)."""
  tfds_dir = info["tfds_dir"].rstrip("/") + "/"
  return sorted(
    rel
    for rel in info.get("files", {})
    if rel.startswith(tfds_dir) and (f"-{split}.array_record" in rel or ".array_record" not in rel)
  )


def text_tokenizer_file(workdir: str) -> str:
  """The prepared text tokenizer's path, its contents checked."""
  path = paths.text_tokenizer_model(workdir)
  check_contents(workdir, [os.path.relpath(path, paths.prepared_dir(workdir))])
  return path


def record_source(workdir: str, split: str) -> Any:
  """The raw TFDS data source of a split: records with `image` still PNG/JPEG bytes and text
  fields as bytes. Random access, picklable. Damaged prepared files are `UserError`s: every
  file's size, and the contents of this split's files (SHA-256: a few ms per MB, less than
  decoding the images it protects; NOTES.md, "Checksums: what verification costs")."""
  info = load_info(workdir)
  _check_split(info, split, workdir)
  check_files(workdir, info)
  check_contents(workdir, _split_files(info, split))
  return records_in(os.path.join(paths.prepared_dir(workdir), info["tfds_dir"]), split)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class DecodeRecord:
  """Record -> contract element; decodes the image unless `decode_image` is False (then
  `image` is the encoded bytes). A class, not a lambda, so it pickles to grain workers."""

  def __init__(self, decode_image: bool = True):
    self.decode_image = decode_image

  def __call__(self, record: dict) -> dict:
    image = record["image"]
    return {
      "image_id": np.int64(record["image_id"]),
      "image": images_lib.decode(image) if self.decode_image else image,
      "captions": [_text(c) for c in record["captions"]],
      "file_name": _text(record["file_name"]),
      "attributes": _text(record["attributes"]),
    }


class CaptionAt:
  """Index i -> caption `i % C` of image `i // C` of a record source."""

  def __init__(self, records: Any, captions_per_image: int):
    self.records = records
    self.captions_per_image = captions_per_image

  def __call__(self, index: int) -> dict:
    image_index, caption_index = divmod(int(index), self.captions_per_image)
    record = self.records[image_index]
    return {
      "image_id": np.int64(record["image_id"]),
      "caption_index": np.int64(caption_index),
      "caption": _text(record["captions"][caption_index]),
    }


def image_source(workdir: str, split: str, *, decode_image: bool = True) -> grain.MapDataset:
  """`MapDataset` of one element per image, in prepared order (see module docstring)."""
  return grain.MapDataset.source(record_source(workdir, split)).map(DecodeRecord(decode_image))


def caption_source(workdir: str, split: str) -> grain.MapDataset:
  """`MapDataset` of one element per caption: element i is caption i % C of image i // C."""
  info = load_info(workdir)
  records = record_source(workdir, split)
  c = int(info["captions_per_image"])
  return grain.MapDataset.range(len(records) * c).map(CaptionAt(records, c))


def read_texts(workdir: str, split: str) -> tuple[np.ndarray, list[str]]:
  """All captions of a split in caption_source order: (`int64 [M]` image ids, M strings)."""
  return texts_of(record_source(workdir, split))


def texts_of(records: Any) -> tuple[np.ndarray, list[str]]:
  """(`int64 [M]` image ids, M captions) of a record source, in caption_source order."""
  image_ids, texts = [], []
  for i in range(len(records)):
    record = records[i]
    for caption in record["captions"]:
      image_ids.append(int(record["image_id"]))
      texts.append(_text(caption))
  return np.asarray(image_ids, np.int64), texts
