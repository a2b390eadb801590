"""The tokenize stage's hand-over: a voken table per fit, `tokenizer/<name>/`.

    voken_table.npz   <split>_image_ids int64[N], <split>_codes int32[N, P] for each split
    vocab.json        VokenVocabulary.to_dict() (token layout, P, D)
    codebook.npy      float32[V_level_tokens, e_dim] initial voken embeddings, level-token order
    summary.json      per-split statistics

`<name>` is a scheme (`avg`, `rq`, ...), or `<scheme>+pseudo` for a fit on pseudo-query pairs
too (`tokenizer.fit.tokenizer_name`). The folder is complete when its fingerprint says so
(avg_jax.artifacts.fingerprint), written after these files; `checksums.json` records them as
written, and `read` checks them (a changed byte in codebook.npy would otherwise train on).
"""

import os

import numpy as np

from avg_jax.artifacts import checksums, fingerprint, io, paths, stage_inputs
from avg_jax.errors import UserError
from avg_jax.vokens import VokenVocabulary

VOKEN_TABLE = "voken_table.npz"
VOCAB = "vocab.json"
CODEBOOK = "codebook.npy"
SUMMARY = "summary.json"
PSEUDO_SUFFIX = "+pseudo"
FILES = (VOKEN_TABLE, CODEBOOK, VOCAB, SUMMARY)

Table = dict[str, tuple[np.ndarray, np.ndarray]]


def voken_table_file(workdir: str, name: str) -> str:
  return os.path.join(paths.tokenizer_dir(workdir, name), VOKEN_TABLE)


def write(
  directory: str, vocab: VokenVocabulary, table: Table, codebook: np.ndarray, summary: dict
) -> None:
  """Writes the table's files (each atomically); the caller then marks the folder complete."""
  arrays = {}
  for split, (image_ids, codes) in table.items():
    arrays[f"{split}_image_ids"] = image_ids
    arrays[f"{split}_codes"] = codes
  io.write_npz(os.path.join(directory, VOKEN_TABLE), **arrays)
  io.atomic_write(
    os.path.join(directory, CODEBOOK), lambda f: np.save(f, codebook.astype(np.float32))
  )
  io.write_json(os.path.join(directory, VOCAB), vocab.to_dict())
  io.write_json(os.path.join(directory, SUMMARY), summary)
  checksums.add(directory, *FILES)


def read(directory: str, remedy: str = "") -> tuple[VokenVocabulary, Table, np.ndarray, dict]:
  """`(vocab, {split: (image_ids int64[N], codes int32[N, P])}, codebook [V, e_dim], summary)`
  of the files in `directory`, checked against the vocabulary: a missing or damaged file is a
  one-line `UserError` naming it, with `remedy` appended."""
  suffix = f"; {remedy}" if remedy else ""
  problem = checksums.check(directory, *FILES)
  if problem:
    raise UserError(f"{problem}{suffix}")
  vocab_dict = io.read_json(os.path.join(directory, VOCAB))
  summary = io.read_json(os.path.join(directory, SUMMARY))
  if vocab_dict is None or summary is None:
    raise UserError(f"{directory}: {VOCAB} or {SUMMARY} is missing or unreadable{suffix}")
  vocab = VokenVocabulary.from_dict(vocab_dict)
  path = os.path.join(directory, VOKEN_TABLE)
  arrays = io.read_npz(path, remedy=remedy)
  table = {}
  for key in arrays:
    if key.endswith("_image_ids"):
      split = key[: -len("_image_ids")]
      if f"{split}_codes" not in arrays:
        raise UserError(f"{path}: missing array {split}_codes{suffix}")
      codes = vocab.validate_codes(arrays[f"{split}_codes"], f"{path} {split}")
      table[split] = (arrays[key].astype(np.int64), codes)
  codebook = io.read_npy(os.path.join(directory, CODEBOOK), remedy=remedy)
  return vocab, table, codebook, summary


def load(
  workdir: str, name: str, made_from: dict | None = None
) -> tuple[VokenVocabulary, Table, np.ndarray]:
  """`(vocab, table, codebook)` of the complete voken table `name` of `workdir`; with
  `made_from` (the tokenize stage's inputs under the reader's config), one made from those."""
  directory = paths.tokenizer_dir(workdir, name)
  scheme, pseudo = name.removesuffix(PSEUDO_SUFFIX), name.endswith(PSEUDO_SUFFIX)
  flags = f"--config.tokenizer.scheme={scheme}" + (
    " --config.protocol=transductive" if pseudo else ""
  )
  if not fingerprint.is_complete(directory):
    raise UserError(
      f"no complete voken table in {directory}; run `avg-jax tokenize` with {flags} first"
    )
  if made_from is not None:
    fingerprint.require(
      directory,
      made_from,
      stage="tokenize",
      remedy=stage_inputs.remedy("tokenize", f" with {flags}"),
    )
  # Rerunning tokenize redoes a damaged output (its up-to-date check reads these files).
  return read(directory, f"rerun `avg-jax tokenize` with {flags}")[:3]


def load_summary(workdir: str, name: str) -> dict:
  """The statistics `tokenize` wrote for the voken table `name`."""
  path = os.path.join(paths.tokenizer_dir(workdir, name), SUMMARY)
  summary = io.read_json(path)
  if summary is None:
    raise UserError(f"{path} is missing or unreadable; run `avg-jax tokenize` again")
  return summary
