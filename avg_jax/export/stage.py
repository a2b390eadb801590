"""`avg-jax export`: writes the serving checkpoint of the finished generator.

Uses the learning-to-rank parameters when that stage finished, else the generative ones.
The indexed images are those of `export.index_splits` (default: the test split).
"""

import itertools
import os
from typing import Iterator

import jax
import numpy as np
from ml_collections import ConfigDict

from avg_jax import config as config_lib
from avg_jax import paths
from avg_jax.data import dataset
from avg_jax.errors import UserError
from avg_jax.export import gallery as gallery_lib
from avg_jax.export import serving
from avg_jax.metrics import MetricsWriter
from avg_jax.training import generative


def file_names(workdir: str, split: str) -> dict:
  """image id -> file name for a split (images are not decoded)."""
  source = dataset.image_source(workdir, split, decode_image=False)
  return {int(source[i]["image_id"]): source[i]["file_name"] for i in range(len(source))}


def gallery_entries(workdir: str, split: str, image_ids) -> Iterator[gallery_lib.Entry]:
  """The page's view of a split's indexed images (file name, captions, encoded image), one
  at a time so that a large split's images are never all in memory."""
  source = dataset.image_source(workdir, split, decode_image=False)
  index_of = {int(source[i]["image_id"]): i for i in range(len(source))}
  for image_id in image_ids:
    if int(image_id) not in index_of:
      yield gallery_lib.Entry(int(image_id), "", [], b"")
      continue
    r = source[index_of[int(image_id)]]
    yield gallery_lib.Entry(int(image_id), r["file_name"], r["captions"], bytes(r["image"]))


def export_is_current(directory: str, config: ConfigDict, stage: str) -> bool:
  """True when `directory` holds a loadable export of this config and source stage."""
  try:
    manifest = serving.read_manifest(directory)
    serving.check_files(directory)
  except UserError:
    return False
  return (manifest.get("config_hash") == config_lib.config_hash(config)
          and manifest["source_stage"] == stage)


def export_is_current(directory: str, config: ConfigDict, stage: str) -> bool:
  """True when `directory` holds a loadable export of this config and source stage."""
  try:
    manifest = serving.read_manifest(directory)
    serving.check_files(directory)
  except UserError:
    return False
  return (manifest.get("config_hash") == config_lib.config_hash(config)
          and manifest["source_stage"] == stage)


def run(config: ConfigDict, workdir: str) -> None:
  scheme = config.tokenizer.scheme
  stage = "rank" if os.path.isdir(generative.params_dir(workdir, scheme, "rank")) else "train"
  directory = paths.export_dir(workdir)
  if export_is_current(directory, config, stage):
    print(f"export: {directory} is complete ({scheme}, {stage} parameters); kept")
    return
  gen, _, params, _ = generative.final_params(config, workdir, scheme, stage)
  ids, codes, names, entries = [], [], [], []
  for split in config.export.index_splits:
    if split not in gen.table:
      raise UserError(f"config export.index_splits: no split {split!r} in the voken table")
    image_ids, split_codes = gen.table[split]
    name_of = file_names(workdir, split)
    ids.append(image_ids)
    codes.append(split_codes)
    names += [name_of.get(int(i), "") for i in image_ids]
    entries.append(gallery_entries(workdir, split, image_ids))
  serving.write_export(
      directory, params=params, cfg=gen.cfg, vocab=gen.vocab, image_ids=np.concatenate(ids),
      codes=np.concatenate(codes), file_names=names, tokenizer=gen.tokenizer,
      decode=dict(beam_size=int(config.decode.beam_size), top_k=int(config.decode.top_k),
                  mask_mode=config.decode.mask_mode,
                  voken_logits_only=bool(config.decode.voken_logits_only),
                  dense_levels=int(config.decode.dense_levels)),
      limits=dict(max_length=int(config.text_tokenizer.max_length),
                  max_query_chars=int(config.export.max_query_chars),
                  batch_buckets=list(config.export.batch_buckets)),
      scheme=scheme, source_stage=stage, config=config_lib.to_json_dict(config),
      config_hash=config_lib.config_hash(config),
      param_dtype=config.export.param_dtype,
      gallery=((itertools.chain(*entries), int(config.export.thumbnail_size))
               if config.export.thumbnail_size > 0 else None))
  MetricsWriter(workdir, "export", process_index=jax.process_index()).write(scheme=scheme, source_stage=stage,
                                         num_images=int(sum(len(i) for i in ids)))
  if jax.process_index() == 0:
    print(f"export: wrote {directory} ({scheme}, {stage} parameters, "
          f"{sum(len(i) for i in ids)} images indexed)")
