"""TFDS-format ArrayRecord datasets: the generated `avg_shapes`, Karpathy-split files, `emoji`.

No TensorFlow is needed: features are plain tensors and text (TFDS serialises them with
protobuf alone), images are stored as PNG/JPEG bytes that `avg_jax.data.dataset` decodes
with PIL. Records keep input order, so record i is image i of its split (less skipped ones).
Builders are not registered in TFDS's global registry (`skip_registration`).

`emoji` (avg_jax/data/emoji.py: pinned npm packages) becomes Karpathy-style entries and is
written by the same builder. Every element: `image_id` int64, `image` encoded bytes,
`captions` (exactly C texts),
`file_name` text, `attributes` text (the scene JSON for avg_shapes, "" for real data).

The expensive part (generating, or reading, decoding and resizing images; encoding them) is
cut into shards of `data.examples_per_shard` input images (`avg_jax.data.shards`) that several
processes share and an interrupted run resumes:

    source = open_source(config)                 # sizes; every input image checked
    write_shards(source, shards_dir, tag, process_index, process_count)   # every process
    result = assemble(source, shards_dir, data_dir, tag)                  # one, after all

Each shard is `<shards_dir>/<split>-<start>-<stop>.array_record` plus a `.json` manifest
written after it (counts, size, SHA-256, images that failed to decode): a shard is done when
its manifest matches its file; a half-written or damaged one is written again with a warning.
`assemble` lays the shards out as TFDS's own writer would (`<name>-<split>.array_record-
0000k-of-0000n` per non-empty shard) and writes TFDS's metadata, so
`tfds.builder_from_directory(...).as_data_source(split)` reads the records in input order
whatever the shard size. `build` does all three in one process.
"""

import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from avg_jax.artifacts import io
from avg_jax.data import images as images_lib
from avg_jax.data import karpathy as karpathy_lib
from avg_jax.data import shapes as shapes_lib
from avg_jax.data import shards as shards_lib
from avg_jax.errors import UserError
from avg_jax.progress import progress

SPLITS = ("train", "val", "test")
DATASETS = ("avg_shapes", "karpathy", "emoji")
SHARD_KEY = "data.examples_per_shard"
_log = logging.getLogger(__name__)


def features(captions_per_image: int) -> tfds.features.FeaturesDict:
  """The record layout shared by both builders (see the module docstring)."""
  return tfds.features.FeaturesDict(
    {
      "image_id": tfds.features.Scalar(np.int64),
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG / JPEG bytes
      "captions": tfds.features.Sequence(tfds.features.Text(), length=captions_per_image),
      "file_name": tfds.features.Text(),
      "attributes": tfds.features.Text(),
    }
  )


# --- The input ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Source:
  """One dataset's input, checked but not decoded: what the shard boundaries cut."""

  config: Any  # the `data` config section
  sizes: dict[str, int]  # input images per split (karpathy: after the check)
  entries: dict[str, list[karpathy_lib.Entry]] | None  # karpathy only
  skipped: list[tuple[str, str]]  # (path, reason) left out by the check
  total: int  # images the input names (for messages)
  # (image id, query) pairs the source itself provides (emoji); None: data.pseudo_queries
  pseudo_queries: list[tuple[int, str]] | None = None


def _check_config(config: Any) -> None:
  if config.image_encoding not in images_lib.ENCODINGS:
    raise UserError(
      f"config data.image_encoding: {config.image_encoding!r} is not one of "
      f"{', '.join(images_lib.ENCODINGS)}"
    )
  if int(config.image_size) < 8:
    raise UserError(f"config data.image_size: {config.image_size} is too small (>= 8)")
  if int(config.captions_per_image) < 1:
    raise UserError(f"config data.captions_per_image: {config.captions_per_image} must be >= 1")
  if config.name not in DATASETS:
    raise UserError(
      f"config data.name: unknown dataset {config.name!r} (expected one of {', '.join(DATASETS)})"
    )


def _check_entries(
  config: Any, entries: dict, where: str, bad: list[tuple[str, str]]
) -> tuple[dict, list[tuple[str, str]]]:
  """Checks every entry before any shard is written: the file exists and decodes
  (`images.check_file`), and it has >= C captions; `bad` are entries the source itself
  found unusable. Every process runs the same checks on the same files, so all agree on the
  kept entries (and the shard boundaries)."""
  c = int(config.captions_per_image)
  total = sum(len(v) for v in entries.values()) + len(bad)
  bad = list(bad) + karpathy_lib.find_bad(entries, c, num_threads=min(32, os.cpu_count() or 1))
  if bad and not config.skip_bad_images:
    lower = (
      "lower data.captions_per_image, "
      if any("captions_per_image" in why for _, why in bad)
      else ""
    )
    raise UserError(
      f"{where}: "
      + karpathy_lib.describe_bad(bad, total)
      + f" (fix or remove them, {lower}or set data.skip_bad_images=True to skip "
      "them)"
    )
  bad_paths = {p for p, _ in bad}
  kept = {split: [e for e in v if e.path not in bad_paths] for split, v in entries.items()}
  return kept, bad


def open_source(config: Any) -> Source:
  """Checks the `data` config and the input files (Karpathy images are decoded once to check
  them, nothing is written); raises `UserError` naming the key or file."""
  _check_config(config)
  if config.name == "avg_shapes":
    for split in SPLITS:
      if int(config[f"num_{split}"]) < 1:
        raise UserError(f"config data.num_{split}: must be >= 1, got {config[f'num_{split}']}")
    sizes = {split: int(config[f"num_{split}"]) for split in SPLITS}
    return Source(config, sizes, None, [], sum(sizes.values()))
  pseudo = None
  if config.name == "emoji":
    from avg_jax.data import emoji, npm_fetch  # noqa: PLC0415 (only this source needs them)

    roots = npm_fetch.fetch(emoji.PACKAGES, str(config.download_dir))
    data = emoji.build(roots, int(config.captions_per_image))
    emoji.check_separation(data)
    where = roots["emoji-datasource-google"]
    entries, skipped = _check_entries(config, data.entries, where, data.too_few)
    kept_ids = {e.image_id for v in entries.values() for e in v}
    pseudo = [(i, q) for i, q in data.pseudo_queries if i in kept_ids]
  else:
    entries = karpathy_lib.read_entries(config.karpathy_json, config.image_root)
    entries, skipped = _check_entries(config, entries, config.karpathy_json, [])
    where = config.karpathy_json
  for split in SPLITS:
    if not entries[split]:
      raise UserError(f"{where}: no usable images in split {split!r}")
  sizes = {split: len(entries[split]) for split in SPLITS}
  return Source(config, sizes, entries, skipped, sum(sizes.values()) + len(skipped), pseudo)


def _examples(
  source: Source, split: str, start: int, stop: int
) -> Iterator[tuple[dict | None, tuple[str, str] | None]]:
  """Input images `[start, stop)` of `split` as `(example, None)`, or `(None, (path, reason))`
  for an image that fails to decode."""
  cfg = source.config
  if source.entries is None:
    first_id = {
      "train": 0,
      "val": source.sizes["train"],
      "test": source.sizes["train"] + source.sizes["val"],
    }[split]
    for ex in shapes_lib.generate(
      split,
      stop,
      int(cfg.image_size),
      int(cfg.generator_seed),
      int(cfg.captions_per_image),
      first_id=first_id,
      start=start,
    ):
      yield (
        {
          "image_id": ex["image_id"],
          "image": images_lib.encode(ex["image"], cfg.image_encoding, cfg.jpeg_quality),
          "captions": ex["captions"],
          "file_name": ex["file_name"],
          "attributes": ex["attributes"],
        },
        None,
      )
    return
  c = int(cfg.captions_per_image)
  loaded = karpathy_lib.load_encoded(
    source.entries[split][start:stop],
    int(cfg.image_size),
    cfg.image_encoding,
    int(cfg.jpeg_quality),
    num_threads=min(32, os.cpu_count() or 1),
  )
  for entry, data, error in loaded:
    if data is None:
      yield None, (entry.path, error)
    else:
      yield (
        {
          "image_id": entry.image_id,
          "image": data,
          "captions": list(entry.captions[:c]),
          "file_name": entry.file_name,
          "attributes": "",
        },
        None,
      )


# --- TFDS builders (metadata, and TFDS's own writer for comparison) ----------------------------


# The call-arg ignores on these classes: tensorflow_datasets has no type information, so mypy
# checks the class keyword against object.__init_subclass__ (TFDS's own takes it).
class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
  """Common base: the `Source`'s examples; no download checksums to look up.

  `assemble` uses a builder for its `info` (features, name, version); `download_and_prepare`
  (TFDS writing everything in one process) still works and is what the tests compare with.
  """

  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = ""

  def __init__(self, *, source: Source, data_dir: str):
    self._source = source
    self.bad: list[tuple[str, str]] = []  # (path, reason) of images that failed to decode
    super().__init__(data_dir=data_dir, file_format="array_record")

  # TFDS looks for a checksums file next to a builder's code; for a builder inside a package
  # (tfds 4.9.10) that lookup imports `importlib_resources`, which TFDS does not install on
  # Python >= 3.9. We download nothing, so there is no code path to search.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      features=features(int(self._source.config.captions_per_image)),
      disable_shuffling=True,
      description=self.DESCRIPTION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    examples = _examples(self._source, split, 0, self._source.sizes[split])
    for key, (example, bad) in enumerate(examples):
      if bad is not None:  # then example is None
        self.bad.append(bad)
      else:
        yield key, example


class AvgShapes(_Builder, skip_registration=True):  # type: ignore[call-arg]
  """Generated shapes scenes with templated captions (avg_jax.data.shapes)."""

  DESCRIPTION = "avg_shapes: generated scenes with captions."


class Karpathy(_Builder, skip_registration=True):  # type: ignore[call-arg]
  """Flickr30K / MS-COCO from a Karpathy split JSON and an image folder.

  Images are resized (shorter side to `image_size`, bicubic) and centre-cropped to a square;
  transparent pixels become white (`images.to_rgb`). Every entry is checked before any
  shard is written (the file decodes, >= C captions; see `open_source`): bad ones are an
  error naming each with its reason, or left out with `data.skip_bad_images`.
  """

  DESCRIPTION = "Karpathy-split image-caption dataset."


def tfds_builder(source: Source, data_dir: str) -> _Builder:
  """The TFDS builder of `source` writing under `data_dir` (nothing is written yet)."""
  cls = AvgShapes if source.entries is None else Karpathy
  return cls(source=source, data_dir=data_dir)


# --- Shards ------------------------------------------------------------------------------------


def plan(source: Source) -> list[shards_lib.Shard]:
  """All shards of all splits (boundaries from the input sizes and data.examples_per_shard)."""
  return shards_lib.plan(source.sizes, int(source.config.examples_per_shard), SHARD_KEY)


def _shard_files(shards_dir: str, shard: shards_lib.Shard) -> tuple[str, str]:
  """(records file, manifest) of a shard."""
  base = os.path.join(shards_dir, shard.name)
  return base + ".array_record", base + ".json"


def write_shard(source: Source, shard: shards_lib.Shard, shards_dir: str, tag: str) -> dict:
  """Writes one shard's records, then its manifest (each atomically); -> the manifest."""
  from array_record.python import array_record_module  # noqa: PLC0415 (TFDS imports it lazily)

  path, manifest_path = _shard_files(shards_dir, shard)
  feats = features(int(source.config.captions_per_image))
  serializer = example_serializer.ExampleSerializer(feats.get_serialized_info())
  num_examples = num_bytes = 0
  bad = []
  with io.atomic_path(path) as tmp:
    # group_size:1 is what TFDS writes: every record is its own chunk (random access).
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
      examples = _examples(source, shard.split, shard.start, shard.stop)
      for example, failure in progress(
        examples, total=len(shard), unit="img", desc=f"{source.config.name} {shard.name}"
      ):
        if failure is not None:  # then example is None
          bad.append(list(failure))
          continue
        record = serializer.serialize_example(feats.encode_example(example))
        writer.write(record)
        num_examples += 1
        num_bytes += len(record)
    finally:
      writer.close()
  manifest = {
    "tag": tag,
    "split": shard.split,
    "start": shard.start,
    "stop": shard.stop,
    "num_examples": num_examples,
    "num_bytes": num_bytes,
    "size": os.path.getsize(path),
    "sha256": io.file_sha256(path),
    "bad": bad,
  }
  io.write_json(manifest_path, manifest)
  return manifest


def shard_status(
  shards_dir: str, shard: shards_lib.Shard, tag: str, *, verify: bool = True
) -> tuple[dict | None, str]:
  """`(manifest, "")` for a finished shard; `(None, why)` for a half-written or damaged one;
  `(None, "")` for one never started. `verify` checks the SHA-256 too (reads the file)."""
  path, manifest_path = _shard_files(shards_dir, shard)
  manifest = io.read_json(manifest_path)
  if manifest is None:
    if os.path.exists(manifest_path):
      return None, "has an unreadable manifest"
    return None, "has no manifest (half-written)" if os.path.exists(path) else ""
  expected = {"tag": tag, "split": shard.split, "start": shard.start, "stop": shard.stop}
  if any(manifest.get(k) != v for k, v in expected.items()):
    return None, "was written for another data config"
  if not os.path.isfile(path):
    return None, "is missing its records file"
  if os.path.getsize(path) != manifest.get("size"):
    return None, f"has {os.path.getsize(path)} bytes, its manifest says {manifest.get('size')}"
  if verify and io.file_sha256(path) != manifest.get("sha256"):
    return None, "does not match its manifest's SHA-256 (damaged)"
  return manifest, ""


def write_shards(
  source: Source, shards_dir: str, tag: str, process_index: int, process_count: int
) -> dict[str, tuple[int, int, int]]:
  """Writes this process's shards that are not done yet (`tag` identifies the config: shards
  with another tag are redone). Prints one line per split; -> `{split: (shards, skipped,
  written)}` counted over this process's shards."""
  os.makedirs(shards_dir, exist_ok=True)
  counts = {split: [0, 0, 0] for split in source.sizes}
  for shard in shards_lib.assigned(plan(source), process_index, process_count):
    counts[shard.split][0] += 1
    manifest, problem = shard_status(shards_dir, shard, tag)
    if manifest is not None:
      counts[shard.split][1] += 1
      continue
    if problem:
      path = _shard_files(shards_dir, shard)[0]
      print(f"warning: prepare shard {path} {problem}; writing it again")
    write_shard(source, shard, shards_dir, tag)
    counts[shard.split][2] += 1
  return shards_lib.report("prepare", counts, process_index, process_count)


# --- Assembling the TFDS directory ---------------------------------------------------------------


@dataclasses.dataclass
class BuildResult:
  builder_dir: str  # .../<name>/<version>: what tfds.builder_from_directory reads
  num_images: dict[str, int]  # per split, after skipping
  skipped: list[tuple[str, str]]  # (path, reason) of skipped images


def _corrupt_message(bad: list[tuple[str, str]], total: int) -> str:
  # Images that passed the check in open_source but failed while the shards were written
  # (changed on disk in between).
  return (
    karpathy_lib.describe_bad(bad, total, "failed to decode while writing the records")
    + " (set data.skip_bad_images=True to skip them)"
  )


def _link_or_copy(src: str, dst: str) -> None:
  # A hard link costs no space and leaves the shard in place should a later step fail;
  # filesystems without links (some network mounts) get a copy.
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def assemble(source: Source, shards_dir: str, data_dir: str, tag: str) -> BuildResult:
  """Lays finished shards out as a TFDS ArrayRecord dataset under `data_dir` (run once, after
  every shard is written). Raises `UserError` for images that failed to decode (unless
  `data.skip_bad_images`) and for a shard that is missing (workdir not shared by all hosts?)."""
  done = []  # (shard, manifest) in plan order
  for shard in plan(source):
    # Sizes only: each writer checked the SHA-256 of the shards it skipped.
    manifest, problem = shard_status(shards_dir, shard, tag, verify=False)
    if manifest is None:
      raise UserError(
        f"prepare shard {_shard_files(shards_dir, shard)[0]} "
        f"{problem or 'is missing'} after every process finished (is the "
        "workdir on storage that all hosts share?)"
      )
    done.append((shard, manifest))
  decode_failures = [tuple(b) for _, m in done for b in m["bad"]]
  if decode_failures and not source.config.skip_bad_images:
    raise UserError(_corrupt_message(decode_failures, source.total))
  builder = tfds_builder(source, data_dir)
  os.makedirs(builder.data_dir, exist_ok=True)
  split_infos, num_images = [], {}
  for split in SPLITS:
    # Empty shards (every image failed to decode) get no file, as with TFDS's own writer.
    kept = [(shard, m) for shard, m in done if shard.split == split and m["num_examples"]]
    if not kept:  # every image of the split failed to decode
      raise UserError(_corrupt_message(decode_failures, source.total))
    template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_dir,
      template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=builder.name,
      split=split,
      filetype_suffix="array_record",
    )
    for k, (shard, _) in enumerate(kept):
      _link_or_copy(
        _shard_files(shards_dir, shard)[0],
        os.fspath(template.sharded_filepath(shard_index=k, num_shards=len(kept))),
      )
    lengths = [m["num_examples"] for _, m in kept]
    split_infos.append(
      tfds.core.SplitInfo(
        name=split,
        shard_lengths=lengths,
        num_bytes=sum(m["num_bytes"] for _, m in kept),
        filename_template=template,
      )
    )
    num_images[split] = sum(lengths)
  builder.info.set_splits(tfds.core.SplitDict(split_infos))
  builder.info.write_to_directory(builder.data_dir)
  skipped = source.skipped + decode_failures
  if skipped:
    _log.warning(
      "%s; skipped them (data.skip_bad_images=True)",
      karpathy_lib.describe_bad(skipped, source.total, "were left out"),
    )
  return BuildResult(builder_dir=str(builder.data_dir), num_images=num_images, skipped=skipped)


def build(config: Any, data_dir: str) -> BuildResult:
  """Writes the dataset named by `config.name` (the `data` config section) as ArrayRecord
  files under `data_dir`, in this process alone; raises `UserError` for bad inputs (naming
  the file / key)."""
  source = open_source(config)
  shards_dir = os.path.join(data_dir, ".shards")
  write_shards(source, shards_dir, "build", 0, 1)
  result = assemble(source, shards_dir, data_dir, "build")
  shutil.rmtree(shards_dir)
  return result
