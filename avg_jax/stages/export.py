"""`avg-jax export`: writes the serving checkpoint of the finished generator.

Uses the learning-to-rank parameters when that stage finished, else the generative ones.
The indexed images are those of `export.index_splits` (default: the test split). avg / rq
exports also carry the dual encoder and the frozen RQ tokenizer, so images can be added later
without retraining (avg_jax/inference/live_index.py).
"""

import itertools
import os
from collections.abc import Iterator

import jax
import numpy as np
from ml_collections import ConfigDict

from avg_jax import config as config_lib
from avg_jax import processes
from avg_jax.artifacts import (
  embeddings,
  exports,
  fingerprint,
  locks,
  paths,
  stage_inputs,
)
from avg_jax.artifacts import results as results_lib
from avg_jax.data import dataset
from avg_jax.errors import UserError
from avg_jax.export import writer
from avg_jax.inference import gallery as gallery_lib
from avg_jax.inference import image_tokenizer as image_tokenizer_lib
from avg_jax.inference import retriever
from avg_jax.metrics import MetricsWriter
from avg_jax.tokenizer import fit as fit_lib
from avg_jax.tokenizer import ids as tokenizer_ids
from avg_jax.tokenizer import schemes
from avg_jax.training import query_head_fit
from avg_jax.training import state as state_lib

# Schemes whose identifiers a frozen tokenizer gives new images (the others cannot grow live).
LIVE_SCHEMES = ("avg", "rq")


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


def _loads(directory: str) -> str:
  """ "" when `directory` holds a loadable export, else what is wrong."""
  try:
    exports.read_manifest(directory)
    retriever.check_files(directory)
  except UserError as e:
    return str(e)
  return ""


def index_codes(gen, splits) -> tuple[np.ndarray, np.ndarray]:
  """`(image ids [N], identifiers [N, T])` of the images of `splits`, one index: the codes the
  generator emits (`gen.codes`). Full identifiers of several splits are disambiguated again
  within their union (each split's are unique only within it)."""
  per_split = [gen.codes(s) for s in splits]
  ids = np.concatenate([i for i, _ in per_split])
  codes = np.concatenate([c for _, c in per_split])
  if len(splits) > 1 and gen.trained_length > gen.vocab.num_levels:
    codes, size = tokenizer_ids.disambiguate(codes[:, : gen.vocab.num_levels], ids)
    if size > gen.vocab.disambiguation_size:
      raise UserError(
        f"config export.index_splits: {len(splits)} splits together need "
        f"{size} disambiguation tokens, the vocabulary has "
        f"{gen.vocab.disambiguation_size}"
      )
    if size == 0:  # no collision in the union: every image is the first of its group
      codes = np.concatenate([codes, np.zeros((len(codes), 1), codes.dtype)], axis=1)
  return ids, codes


def _live_parts(
  config: ConfigDict, workdir: str, gen, splits, index_ids: np.ndarray, index_codes_: np.ndarray
) -> tuple[tuple, dict]:
  """`(image_tokenizer, live)` for `writer.write_export`: the fit's final RQ-VAE, and the
  manifest's "live" record. The restored tokenizer must give the indexed images the semantic
  codes `tokenize` gave them; the share that agrees is recorded (`code_agreement`) and a
  tokenizer that disagrees on most is refused (it is not the one the generator learned)."""
  name = fit_lib.tokenizer_name(config, config.tokenizer.scheme, str(config.protocol))
  parts = [embeddings.load(workdir, s) for s in splits]
  emb_ids = np.concatenate([p["image_ids"] for p in parts]).astype(np.int64)
  emb = np.concatenate([p["image_emb"] for p in parts]).astype(np.float32)
  cfg, params, batch_stats = schemes.final_rqvae(
    config, paths.tokenizer_dir(workdir, name), emb.shape[1]
  )
  tok = image_tokenizer_lib.ImageTokenizer(cfg, {"params": params, "batch_stats": batch_stats})
  row_of = {int(i): r for r, i in enumerate(emb_ids)}
  rows = np.array([row_of[int(i)] for i in index_ids])
  levels = gen.vocab.num_levels
  agreement = float(np.mean(np.all(tok.codes(emb[rows]) == index_codes_[:, :levels], axis=1)))
  if agreement < 0.9:
    raise UserError(
      f"{paths.tokenizer_dir(workdir, name)}: the tokenizer's newest checkpoint "
      f"gives only {agreement:.0%} of the indexed images their voken-table codes; "
      f"rerun `avg-jax tokenize`"
    )
  live = dict(
    image_size=int(config.data.image_size),
    image_encoding=str(config.data.image_encoding),
    jpeg_quality=int(config.data.jpeg_quality),
    tokenizer=name,
    thumbnail_size=int(config.export.thumbnail_size) or 256,
    code_agreement=agreement,
  )
  return (cfg, params, batch_stats), live


def hybrid_config(config: ConfigDict, workdir: str) -> ConfigDict:
  """`config` with the avg_hybrid fusion weight in `decode.hybrid_weight` when
  `export.hybrid` is on: the config's own weight, else the one `evaluate` chose on validation
  for this protocol."""
  if not config.export.hybrid:
    return config
  weight = config.decode.hybrid_weight
  if weight is None:
    chosen = None
    if os.path.exists(paths.evaluate_results_file(workdir)):
      chosen = results_lib.read(workdir).hybrid.get(str(config.protocol))
    if chosen is None:
      raise UserError(
        "config export.hybrid: no fusion weight; set decode.hybrid_weight or run "
        "`avg-jax evaluate` with avg_hybrid in evaluate.methods first"
      )
    weight = chosen.weight
  c = ConfigDict(config.to_dict())
  c.decode.hybrid_weight = float(weight)
  c.lock()
  return c


@locks.holding("export")
def run(config: ConfigDict, workdir: str) -> None:
  config = hybrid_config(config, workdir)
  scheme = config.tokenizer.scheme
  protocol = str(config.protocol)
  stage = (
    "rank" if os.path.isdir(state_lib.params_dir(workdir, scheme, protocol, "rank")) else "train"
  )
  directory = paths.export_dir(workdir)
  # The folder is written whole (a temporary folder renamed into place), then marked complete;
  # made from the settings of every stage before it and the stage whose parameters it serves
  # (avg_jax/artifacts/stage_inputs.py), redone when they change.
  out = fingerprint.Output(
    directory,
    dict(stage_inputs.inputs("export", config, workdir=workdir), source_stage=stage),
    stage="export",
    on_other=stage_inputs.STAGES["export"].on_other,
  )
  if out.done(verify=lambda: _loads(directory)):
    print(f"export: {directory} is complete ({scheme}, {stage} parameters); kept")
    return
  stage_inputs.require(config, workdir, "prepare", "embed")
  gen, gmesh, params, _ = state_lib.final_params(config, workdir, scheme, stage, protocol)
  # avg_hybrid without a text tower: the generator's query head, fitted as evaluate fits it.
  query_head = (
    query_head_fit.fit_query_head(gen, params, gmesh, workdir, config)
    if gen.decode.uses_query_head
    else None
  )
  splits = list(config.export.index_splits)
  names, entries = [], []
  for split in splits:
    if split not in gen.table:
      raise UserError(f"config export.index_splits: no split {split!r} in the voken table")
    image_ids = gen.table[split][0]
    name_of = file_names(workdir, split)
    names += [name_of.get(int(i), "") for i in image_ids]
    entries.append(gallery_entries(workdir, split, image_ids))
  index_ids, index_codes_ = index_codes(gen, splits)
  # (workdir, image ids [N] | None, image embeddings [N, D] | None): see writer.write_export.
  dual_encoder: tuple[str, np.ndarray | None, np.ndarray | None] | None = None
  image_tokenizer, live = None, None
  if gen.decode.needs_embeddings:
    parts = [embeddings.load(workdir, s) for s in splits]
    dual_encoder = (
      workdir,
      np.concatenate([p["image_ids"] for p in parts]),
      np.concatenate([p["image_emb"] for p in parts]),
    )
  if scheme in LIVE_SCHEMES:
    # What a new image needs to join the index without retraining: the image tower it is
    # embedded with, the frozen RQ tokenizer that gives its codes, and how `prepare` stored
    # images (the same pixels reach the encoder as in the embed stage).
    if dual_encoder is None:
      dual_encoder = (workdir, None, None)
    image_tokenizer, live = _live_parts(config, workdir, gen, splits, index_ids, index_codes_)
  writer.write_export(
    directory,
    params=params,
    cfg=gen.cfg,
    vocab=gen.vocab,
    image_ids=index_ids,
    codes=index_codes_,
    file_names=names,
    tokenizer=gen.tokenizer,
    decode=gen.decode.for_generator(gen.trained_length).to_dict(),
    dual_encoder=dual_encoder,
    image_tokenizer=image_tokenizer,
    live=live,
    query_head=query_head,
    limits=dict(
      max_length=int(config.text_tokenizer.max_length),
      max_query_chars=int(config.export.max_query_chars),
      batch_buckets=list(config.export.batch_buckets),
    ),
    scheme=scheme,
    source_stage=stage,
    config=config_lib.to_json_dict(config),
    config_hash=fingerprint.config_hash(config),
    param_dtype=config.export.param_dtype,
    gallery=(
      (itertools.chain(*entries), int(config.export.thumbnail_size))
      if config.export.thumbnail_size > 0
      else None
    ),
  )
  out.finish()
  MetricsWriter(workdir, "export", process_index=jax.process_index()).write(
    scheme=scheme, source_stage=stage, num_images=int(len(index_ids))
  )
  if processes.is_main():
    print(
      f"export: wrote {directory} ({scheme}, {protocol}, {stage} parameters, "
      f"{len(index_ids)} images indexed, tie-break {gen.decode.tie_break}"
      + (
        f", avg_hybrid weight {gen.decode.hybrid_weight:g})"
        if gen.decode.hybrid_weight is not None
        else ")"
      )
    )
