"""`avg-jax tokenize`: image embeddings -> unique voken identifiers for every image.

Reads the embed stage's `embeddings_<split>.npz` (train required; val / test when present, and
the pseudo-query embeddings for a fit on them), fits `config.tokenizer.scheme` on the pairs the
protocol gives it (avg_jax/tokenizer/fit.py), turns its codes into identifiers unique within
each split (avg_jax/tokenizer/schemes.py) and writes the voken table
(avg_jax/artifacts/voken_tables.py) into `paths.tokenizer_dir(workdir, name)`, with the RQ-VAE's
checkpoints/ (avg / rq) beside it.

Rerunning with the same config and embeddings does nothing (a damaged output is redone); a
complete folder made with another config is an error (remove it, or use another workdir); an
unfinished one (a run that failed) is started again.
"""

import jax
import ml_collections
import numpy as np

from avg_jax import processes
from avg_jax.artifacts import embeddings as embeddings_lib
from avg_jax.artifacts import fingerprint, locks, paths, stage_inputs, voken_tables
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.errors import UserError
from avg_jax.metrics import MetricsWriter
from avg_jax.tokenizer import analysis, schemes
from avg_jax.tokenizer import fit as fit_lib

SPLITS = ("train", "val", "test")
_said_kept: set[str] = set()  # tables this process has reported as kept (see `run`)


def inputs(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """What a voken table is made from (avg_jax/artifacts/stage_inputs.py: the tokenizer
  config, seed, text vocabulary size, and the embed stage's inputs)."""
  return stage_inputs.inputs("tokenize", config, workdir=workdir)


def _loads(directory: str) -> str:
  """ "" when every output of `directory` is intact (its checksums) and loads, else what is
  wrong."""
  try:
    voken_tables.read(directory)
  except UserError as e:  # names the file and what differs
    return str(e)
  except Exception as e:  # numpy / json / zip errors of damaged files have many types
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  return ""


@locks.holding("tokenize")
def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Builds and writes the voken table of `config.tokenizer.scheme` for `config.protocol`
  (see module doc)."""
  tok = config.tokenizer
  scheme = fit_lib.check_scheme(str(tok.scheme))
  protocol = pseudo_lib.check_protocol(str(config.protocol))
  stage_inputs.require(config, workdir, "prepare", "embed")
  embeddings = {}
  for split in SPLITS:
    data = embeddings_lib.load_checked(workdir, split)
    if data is not None:
      embeddings[split] = data
  if "train" not in embeddings:
    raise UserError(
      f"{paths.embeddings_file(workdir, 'train')} not found; run `avg-jax embed` first"
    )
  all_ids = np.concatenate([d["image_ids"] for d in embeddings.values()])
  if len(np.unique(all_ids)) != len(all_ids):
    raise UserError(f"image ids repeat across the splits' embeddings in {paths.embed_dir(workdir)}")

  name = fit_lib.tokenizer_name(config, scheme, protocol)
  pseudo = None
  if fit_lib.fits_on_pseudo_queries(config, scheme, protocol):
    pseudo = embeddings_lib.load_pseudo_queries(workdir)
  fit = fit_lib.fit_pairs(embeddings, pseudo)
  directory = paths.tokenizer_dir(workdir, name)
  out = fingerprint.Output(
    directory,
    inputs(config, workdir),
    stage=f"tokenize [{name}]",
    on_other=stage_inputs.STAGES["tokenize"].on_other,
  )
  if out.done(verify=lambda: _loads(directory)):
    # One line, once per process: evaluate re-enters this stage for every method and
    # protocol that uses the table, and its statistics were printed when it was made.
    if directory not in _said_kept:
      _said_kept.add(directory)
      print(
        f"tokenize [{name}]: {directory} is complete for this config; kept (statistics in "
        f"its {voken_tables.SUMMARY})"
      )
    return
  out.begin()

  codes, codebook, split_stats, shared = schemes.codes_and_codebook(
    config, workdir, directory, embeddings, fit, scheme, name
  )
  vocab, table, summary = schemes.identifiers(
    config,
    embeddings,
    codes,
    codebook,
    split_stats,
    scheme=scheme,
    name=name,
    fit_on=fit["description"],
    shared=shared,
  )

  analysis_split = str(tok.analysis_split)
  if analysis_split in table:
    image_ids, split_codes = table[analysis_split]
    features = analysis.load_features(workdir, analysis_split, image_ids)
    if features is not None:
      summary["semantic_split"] = analysis_split
      summary["semantic"] = analysis.semantic_similarity(
        split_codes, features, num_pairs=int(tok.analysis_pairs), seed=int(config.seed)
      )

  writer = MetricsWriter(workdir, "tokenize", process_index=jax.process_index())
  for split, s in summary["splits"].items():
    writer.write(
      method=name,
      split=split,
      disambiguation_size=vocab.disambiguation_size,
      id_length=vocab.id_length,
      **s,
    )
  if summary.get("semantic"):
    writer.write(method=name, split=summary["semantic_split"], semantic=summary["semantic"])
  if processes.is_main():
    voken_tables.write(directory, vocab, table, codebook, summary)
  out.finish()
  print(schemes.format_summary(name, summary))
