"""What each stage's output is made from: one table of the config keys every stage reads.

`STAGES` declares, per stage,

    upstream   the stages whose outputs it loads: their inputs are its inputs too;
    reads      the config sections or keys that can change its output;
    reports    keys it reads that cannot (the validation search while training, the two-tower
               metrics embed prints, which optional file it makes), each with the reason;
               the more specific entry wins (rank's `reads` "decode.mask_mode" within its
               `reports` "decode"; tokenize's `reports` "tokenizer.fit_on_pseudo_queries"
               within its `reads` "tokenizer").

`NEUTRAL` names, once, the keys no stage's result depends on (how work is split across
devices and shards, logged, checkpointed or batched for evaluation), and `TOOLS` the sections
only the tools read. A key of a declared section is an input unless it is neutral, so a new
setting is an input of the stage whose section holds it until someone declares it neutral:
a forgotten declaration costs a rerun, never a stale result.

`inputs(stage, config)` is the stage's record of what it is made from: the value of every key
its reads and its upstream stages' reads cover, and the digests of the input files such keys
name (`FILES`, hashed by prepare). A setting therefore changes exactly the inputs of the
stages that read it and of every stage built on their outputs (docs/fingerprints.md lists
them; tests/artifacts/test_artifacts_stage_inputs.py checks this table against the keys the
stages read while they run). `avg_jax.artifacts.fingerprint.Output` compares them with the
record in the stage's folder, and `require` checks an output another stage is about to load.
"""

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

from avg_jax import config as config_lib
from avg_jax.artifacts import fingerprint, io, paths
from avg_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Stage:
  upstream: tuple[str, ...]
  reads: tuple[str, ...]
  reports: Mapping[str, str] = dataclasses.field(default_factory=dict)
  # A finished output from other inputs: "refuse" (expensive, and later stages were built on
  # it: the user removes it) or "redo" (a generator retrained after a tuning change).
  on_other: str = "redo"


# Validation while a generator trains: metrics.jsonl only, never the parameters.
_VALIDATION = "the validation search while training (its metrics only)"
# Whether the disambiguation position is a target ("learned") is recorded with the voken
# table's digest (`Generator.table_hash`) by train and rank; similarity and image_id train the
# same generator (the rank stage's candidate search has no query embeddings to order by).
_TARGETS = "which targets: in the record's voken table digest"

# Keys added after outputs were first recorded, with the value that does what the code did
# before them. At that value a key is left out of the record, so an output made before the key
# existed stays valid (a user's trained models survive an upgrade); any other value is an
# input like the rest.
ADDED_KEYS: dict[str, Any] = {
  "train.pseudo_queries_of_training_images": False,
}

# In pipeline order: a stage's upstream stages come before it.
STAGES: dict[str, Stage] = {
  "prepare": Stage(
    upstream=(),
    reads=(
      "data",
      "text_tokenizer.model_path",
      "text_tokenizer.vocab_size",
      "text_tokenizer.model_type",
      # A pretrained T5 brings the text tokenizer (its spiece.model).
      "t5.pretrained_path",
    ),
    on_other="refuse",
  ),
  "embed": Stage(
    upstream=("prepare",),
    reads=("seed", "loader.shuffle_seed", "encoder", "encoder_train"),
    reports={
      "protocol": "whether the pseudo queries are embedded (the same values whenever)",
      "evaluate.protocols": "the same",
      "tokenizer.fit_on_pseudo_queries": "the same",
      "evaluate.recall_ks": "the two-tower Recall@K it prints",
    },
    on_other="refuse",
  ),
  "tokenize": Stage(
    upstream=("embed",),
    # t5.vocab_size: the voken vocabulary's token ids start after the text rows.
    reads=("seed", "tokenizer", "t5.vocab_size"),
    # Whether a fit adds the pseudo-query pairs is in the folder's name (`<scheme>+pseudo`):
    # one folder holds one fit whatever protocol asked for it.
    reports={
      "protocol": "which fit (the folder's name)",
      "tokenizer.fit_on_pseudo_queries": "the same",
    },
    on_other="refuse",
  ),
  "train": Stage(
    upstream=("prepare", "tokenize"),
    reads=(
      "seed",
      "protocol",
      "loader.shuffle_seed",
      "text_tokenizer.max_length",
      "t5",
      "train",
      # Which fit's voken table it is trained on (transductive: `<scheme>+pseudo`).
      "tokenizer.fit_on_pseudo_queries",
    ),
    reports={
      "decode": _VALIDATION,
      "evaluate.recall_ks": _VALIDATION,
      "decode.tie_break": _TARGETS,
    },
  ),
  "rank": Stage(
    upstream=("prepare", "tokenize", "train"),
    # The candidates of the listwise loss come from the search: its scoring settings.
    reads=("rank", "decode.mask_mode", "decode.voken_logits_only"),
    reports={
      "decode": _VALIDATION,
      "evaluate.recall_ks": _VALIDATION,
      "decode.tie_break": _TARGETS,
    },
  ),
  "evaluate": Stage(
    # It also runs the tokenize / train / rank stages of the schemes it compares.
    upstream=("prepare", "embed", "tokenize", "train", "rank"),
    reads=("evaluate", "decode"),
  ),
  "export": Stage(
    # The fusion weight evaluate chose reaches it as decode.hybrid_weight.
    upstream=("prepare", "embed", "tokenize", "train", "rank"),
    reads=("export", "decode"),
  ),
}

# Keys (or sections) that change how a result is computed, never the result. Resuming from a
# checkpoint is bit-identical, and a run on N processes equals a one-process run (tested), so
# checkpoint cadence and device layout are neutral.
NEUTRAL: dict[str, str] = {
  "required_inputs": "input paths checked before any stage",
  "mesh": "device layout",
  "partitioning": "device layout",
  "distributed": "process layout",
  "loader.worker_count": "reader processes",
  "loader.worker_buffer_size": "reader buffers",
  "loader.read_threads": "reader threads",
  "loader.prefetch_buffer_size": "reader buffers",
  "data.examples_per_shard": "how prepare splits its work (the same records)",
  "data.download_dir": "where the pinned emoji packages are unpacked (SHA-256 checked)",
  "encoder.remat": "recomputation in the backward pass (the same values)",
  "t5.remat": "recomputation in the backward pass (the same values)",
  "encoder_train.embed_batch_size": "batching",
  "encoder_train.embed_images_per_shard": "how embed splits its work",
  "encoder_train.log_every": "logging",
  "encoder_train.checkpoint_every": "checkpoints",
  "encoder_train.query_batch_size": "batching",
  "encoder_train.retrieval_chunk_size": "batching",
  "tokenizer.checkpoint_every": "checkpoints",
  "tokenizer.keep_checkpoints": "checkpoints",
  "tokenizer.log_every": "logging",
  "tokenizer.assign_batch_size": "batching",
  "tokenizer.analysis_split": "the semantic measure tokenize prints (not the voken table)",
  "tokenizer.analysis_pairs": "the semantic measure tokenize prints (not the voken table)",
  "train.checkpoint_every": "checkpoints",
  "train.keep_checkpoints": "checkpoints",
  "train.async_checkpointing": "checkpoints",
  "train.log_every": "logging",
  "train.eval_every": "validation metrics while training",
  "train.eval_max_queries": "validation metrics while training",
  "rank.checkpoint_every": "checkpoints",
  "rank.eval_every": "validation metrics while training",
  "decode.batch_size": "batching",
  "decode.dense_levels": "how the prefix tree is stored on the device (the same search)",
}

# Sections no stage reads: the tools' (`avg-jax compile`, `avg-jax bench`).
TOOLS: dict[str, str] = {"aot": "avg-jax compile", "bench": "avg-jax bench"}

# Config keys naming input files whose contents are inputs of the prepare stage (`""`: the
# file itself; else a file inside the named folder). prepare hashes them; every later stage
# takes their digests from prepare's record, so a moved input file never blocks a finished
# pipeline. Large inputs (image folders, pretrained weights) are named by path only: hashing
# gigabytes at every start would cost more than it protects.
FILES: dict[str, tuple[str, ...]] = {
  "data.karpathy_json": ("",),
  "data.pseudo_queries": ("",),
  "text_tokenizer.model_path": ("",),
  "t5.pretrained_path": ("spiece.model",),
}


def _matches(key: str, entry: str) -> bool:
  return key == entry or key.startswith(entry + ".")


def _match(key: str, entries) -> str:
  """The most specific of `entries` that `key` is or lies under ("" when none)."""
  return max((e for e in entries if _matches(key, e)), key=len, default="")


def leaves(config: Any, prefix: str = "") -> dict[str, Any]:
  """`{dotted key: value}` of every leaf of a ConfigDict or dict (read as one copy, so that
  the whole config is not counted as read by the stage that asks)."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  out = {}
  for key, value in config.items():
    path = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(leaves(value, path))
    else:
      out[path] = value
  return out


# The tables above are constants: a key's classification is computed once per process (the
# stages ask for every key of the config at each start).
@functools.cache
def is_neutral(key: str) -> bool:
  return bool(_match(key, NEUTRAL)) or bool(_match(key, TOOLS))


def closure(stage: str) -> tuple[str, ...]:
  """`stage` and every stage whose output reaches it, in pipeline order."""
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}")
  found = {stage}
  for name in reversed(list(STAGES)):
    if name in found:
      found.update(STAGES[name].upstream)
  return tuple(s for s in STAGES if s in found)


@functools.cache
def reads_key(stage: str, key: str) -> bool:
  """Whether `stage` itself declares `key` (a leaf) among the keys that change its output:
  its most specific entry is in `reads` (not `reports`), and the key is not neutral."""
  entry = _match(key, (*STAGES[stage].reads, *STAGES[stage].reports))
  return bool(entry) and entry in STAGES[stage].reads and not is_neutral(key)


def input_keys(stage: str, keys) -> list[str]:
  """The keys among `keys` (leaves) that are inputs of `stage`: read by it or by a stage
  upstream of it, and not neutral."""
  stages = closure(stage)
  return sorted(k for k in keys if any(reads_key(s, k) for s in stages))


def _canonical(value: Any) -> Any:
  """Values as JSON stores them (tuples as lists), so that a record compares equal to the
  inputs it was written from."""
  if isinstance(value, (tuple, list)):
    return [_canonical(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _canonical(v) for k, v in value.items()}
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def _file_digest(key: str, value: str) -> dict:
  """`{name: sha256 or "missing"}` of the files the path `value` of `key` stands for."""
  out = {}
  for name in FILES[key]:
    path = os.path.join(value, name) if name else value
    try:
      out[name or "file"] = io.file_sha256(path)[:16] if os.path.isfile(path) else "missing"
    except OSError as e:
      raise UserError(f"config key {key}: cannot read {path} ({e.strerror})") from e
  return out


def remedy(stage: str, flags: str = "") -> str:
  """What to do when `stage`'s output was made from other inputs than a config's."""
  if STAGES[stage].on_other == "refuse":
    return f"remove it and rerun `avg-jax {stage}`{flags}, or run with the config it was made from"
  return f"rerun `avg-jax {stage}`{flags}"


def _prepared_files(workdir: str) -> dict:
  """The input-file digests in `workdir`'s prepare record ({} without one)."""
  stored = io.read_json(os.path.join(paths.prepared_dir(workdir), fingerprint.RECORD)) or {}
  files = (stored.get("inputs") or {}).get("files")
  return files if isinstance(files, dict) else {}


def inputs(
  stage: str, config: Any, overrides: Mapping[str, Any] | None = None, workdir: str | None = None
) -> dict:
  """What `stage` makes its output from under `config` (with `overrides`, dotted keys, on
  top: the scheme and protocol of one of evaluate's generators): `{"config": {key: value},
  "files": {key: {name: sha256}}}`. Without `workdir` (the prepare stage making its record)
  the input files are hashed; with it, their digests come from prepare's record there, so a
  stage that checks or makes a later output never needs the input files again."""
  values = leaves(config)
  values.update(overrides or {})
  keys = [
    k for k in input_keys(stage, values) if not (k in ADDED_KEYS and values[k] == ADDED_KEYS[k])
  ]
  if workdir is not None:
    files = _prepared_files(workdir)
  else:
    files = {k: _file_digest(k, str(values[k])) for k in keys if k in FILES and values[k]}
  return {"config": {k: _canonical(values[k]) for k in keys}, "files": files}


# The stages with one folder per workdir, which every later stage reads.
_FOLDERS = {"prepare": paths.prepared_dir, "embed": paths.embed_dir}


def require(config: Any, workdir: str, *stages: str) -> None:
  """Each of `stages` (prepare, embed) holds a complete output made from `config`'s settings,
  else a one-line `UserError` naming the changed keys and what to do."""
  for stage in stages:
    fingerprint.require(
      _FOLDERS[stage](workdir),
      inputs(stage, config, workdir=workdir),
      stage=stage,
      remedy=remedy(stage),
    )


def stages_of(key: str) -> list[str]:
  """The stages whose output a change of `key` (a leaf) reaches: those that read it and those
  built on their outputs, in pipeline order."""
  return [s for s in STAGES if any(reads_key(u, key) for u in closure(s))]


def _why_neutral(key: str) -> str:
  entry = _match(key, NEUTRAL)
  if entry:
    return NEUTRAL[entry]
  entry = _match(key, TOOLS)
  return f"read by `{TOOLS[entry]}` only" if entry else "UNDECLARED"


def markdown_table(config: Any) -> str:
  """docs/fingerprints.md's table: the keys of `config`, grouped by section and by the stages
  a change of them reruns."""
  rows: dict[tuple[str, str], list[str]] = {}
  for key in sorted(leaves(config)):
    what = ", ".join(stages_of(key)) or "none"
    rows.setdefault((key.split(".")[0], what), []).append(key)
  lines = ["| keys | a change reaches |", "| --- | --- |"]
  for (_, what), keys in rows.items():
    if what == "none":  # neutral: say why, once per reason
      what += ": " + "; ".join(dict.fromkeys(_why_neutral(k) for k in keys))
    lines.append(f"| {', '.join(f'`{k}`' for k in keys)} | {what} |")
  return "\n".join(lines)


if __name__ == "__main__":
  # `python -m avg_jax.artifacts.stage_inputs`: docs/fingerprints.md's table, for configs/base.py.
  import sys

  sys.path.insert(0, config_lib.REPO_ROOT)
  from configs import base  # pylint: disable=import-error

  print(markdown_table(base.get_base_config()))
