"""One answer, for every stage, to "is this output complete, and made from these inputs?".

A stage's output folder carries `fingerprint.json`, written by process 0:

    {"format": 2, "stage": "tokenize", "inputs": {...}, "complete": false | true, "facts": {...}}

`inputs` are what the result depends on: `avg_jax.artifacts.stage_inputs.inputs` -- the value
of every config key the stage and the stages before it read that can change a result, and
digests of the input files such keys name -- plus what a stage adds of its own (the voken
table a generator is trained on). `facts` describe the finished result.

A stage asks `Output.done()` first: complete from these inputs (and facts, and its own check
that its files are intact and load) means nothing to do. A complete output from other inputs
is refused with the changed keys named (`on_other="refuse"`: expensive results, e.g. the
prepared data) or redone (`"redo"`: a generator retrained after a tuning change, results that
are cheap). Before writing, `begin()` claims the folder: an unfinished record from other
inputs means its partial outputs (checkpoints, shards) were made from them, so they are
removed and a corrected rerun starts clean instead of being refused. `finish()` marks the
folder complete, after its last output. A stage that loads another's output first asks
`require()`: complete, and made from what this config says, or a one-line error naming the
changed keys and the stage to rerun -- so no stage builds on an output of other settings.

Beside it: the content checksums of the stage's files (avg_jax/artifacts/checksums.py),
checked by the stage's `done()` and by every reader, and the per-(workdir, stage) lock held
around a stage (avg_jax/artifacts/locks.py).
"""

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from avg_jax import config as config_lib
from avg_jax import processes
from avg_jax.artifacts import io
from avg_jax.errors import UserError

log = logging.getLogger(__name__)

RECORD = "fingerprint.json"
FORMAT = 2  # 2: inputs from the stage table (stage_inputs); records of format 1 are redone


def canonical(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists, keys strings)."""
  return json.loads(json.dumps(value, default=str))


def digest(value: Any) -> str:
  """A short stable hash of a JSON-able value (keys sorted)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(config: Any) -> str:
  """`digest` of a whole config (result metadata; inputs of outputs that depend on all of it)."""
  return digest(config_lib.to_json_dict(config))


def _flat(value: Any, prefix: str = "") -> dict:
  if isinstance(value, dict):
    out = {}
    for key, item in value.items():
      out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out
  return {prefix: value}


def changes(old: Any, new: dict, limit: int = 4) -> str:
  """`a.b: 1 -> 2; c: <unset> -> 3` for the keys whose values differ (nested dicts dotted)."""
  if not isinstance(old, dict):
    return "made by an older avg-jax"
  old, new = _flat(old), _flat(new)
  diffs = [
    f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
    for k in sorted(set(old) | set(new))
    if old.get(k) != new.get(k)
  ]
  return "; ".join(diffs[:limit]) + ("; ..." if len(diffs) > limit else "")


def is_complete(directory: str) -> bool:
  """Whether `directory` holds a complete output, whatever it was made from (for readers of
  another stage's output; the stage itself checks its inputs with `Output.done`)."""
  stored = io.read_json(os.path.join(directory, RECORD))
  return bool(stored and stored.get("format") == FORMAT and stored.get("complete"))


def made_from(directory: str, inputs: dict) -> str:
  """ "" when `directory` holds a complete output whose recorded inputs include `inputs`
  (the keys of `inputs` only: what a stage adds of its own is its business), else why not:
  "missing" when there is no complete record (an unfinished or older one counts as none)."""
  stored = io.read_json(os.path.join(directory, RECORD))
  if not (stored and stored.get("format") == FORMAT and stored.get("complete")):
    return "missing"
  expected = canonical(inputs)
  inputs_recorded = stored.get("inputs")
  if not isinstance(inputs_recorded, dict):
    inputs_recorded = {}
  recorded = {k: inputs_recorded.get(k) for k in expected}
  return "" if recorded == expected else changes(recorded, expected)


def require(directory: str, inputs: dict, *, stage: str, remedy: str) -> None:
  """Raises a one-line `UserError` unless `directory` holds a complete output of `stage`
  made from `inputs` (`made_from`); `remedy` says what to do (the stage to run). Without any
  record there (no such folder, or files put there by hand) the reader's own loading says
  what is missing."""
  if not os.path.exists(os.path.join(directory, RECORD)):
    return
  problem = made_from(directory, inputs)
  if problem == "missing":
    raise UserError(f"no complete {stage} output in {directory}; {remedy}")
  if problem:
    raise UserError(
      f"{directory} was made from other inputs than this config's ({problem}); {remedy}"
    )


class Output:
  """A stage's output folder and the inputs it must be made from (see the module doc)."""

  def __init__(self, directory: str, inputs: dict, *, stage: str, on_other: str = "refuse"):
    if on_other not in ("refuse", "redo"):
      raise ValueError(f"on_other must be 'refuse' or 'redo', got {on_other!r}")
    self.directory = directory
    self.inputs = canonical(inputs)
    self.stage = stage
    self.on_other = on_other

  @property
  def path(self) -> str:
    return os.path.join(self.directory, RECORD)

  def record(self) -> dict | None:
    """The stored record; an unreadable or older one reads as unfinished with unknown inputs."""
    if not os.path.exists(self.path):
      return None
    stored = io.read_json(self.path)
    if stored is None or stored.get("format") != FORMAT:
      return {"inputs": None, "complete": False}
    return stored

  def done(self, verify: Callable[[], str] | None = None, **facts: Any) -> bool:
    """True when the folder is complete from these inputs with these `facts` and
    `verify()` (the stage's own check that its files load) returns "" rather than a problem.
    Raises `UserError` for a complete folder from other inputs under `on_other="refuse"`."""
    stored = self.record()
    if stored is None:
      return False
    if stored.get("inputs") != self.inputs:
      if stored.get("complete") and self.on_other == "refuse":
        raise UserError(
          f"{self.directory} was made from other inputs "
          f"({changes(stored.get('inputs'), self.inputs)}); remove it or use "
          f"another --workdir"
        )
      return False
    if not stored.get("complete"):
      return False
    if any(stored.get("facts", {}).get(k) != canonical(v) for k, v in facts.items()):
      return False
    problem = verify() if verify is not None else ""
    if problem:
      log.warning(
        "%s: %s has a damaged output (%s); redoing it", self.stage, self.directory, problem
      )
      return False
    return True

  def begin(self) -> None:
    """Claims the folder for these inputs before any output is written (every process calls
    it; process 0 writes). Outputs of other inputs found there are removed first."""
    stored = self.record()
    if processes.is_main():
      if stored is not None and stored.get("inputs") != self.inputs:
        what = "outputs" if stored.get("complete") else "unfinished outputs"
        print(
          f"{self.stage}: removing the {what} of other inputs in {self.directory} "
          f"({changes(stored.get('inputs'), self.inputs)})"
        )
        shutil.rmtree(self.directory)
      os.makedirs(self.directory, exist_ok=True)
      self._write(self.directory, complete=False, facts={})
    processes.barrier(f"{self.stage}: claimed {self.directory}")

  def finish(self, *, into: str | None = None, **facts: Any) -> None:
    """Marks the folder complete, after its last output (every process calls it; process 0
    writes). `into`: write the record into that folder instead (a temporary folder about to
    be renamed into place by its only writer; no processes are synchronised)."""
    if into is not None:
      self._write(into, complete=True, facts=facts)
      return
    if processes.is_main():
      self._write(self.directory, complete=True, facts=facts)
    processes.barrier(f"{self.stage}: finished {self.directory}")

  def _write(self, directory: str, *, complete: bool, facts: dict) -> None:
    io.write_json(
      os.path.join(directory, RECORD),
      {
        "format": FORMAT,
        "stage": self.stage,
        "inputs": self.inputs,
        "complete": complete,
        "facts": canonical(facts),
      },
    )
