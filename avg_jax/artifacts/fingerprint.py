"""One answer, for every stage, to "is this output complete, and made from these inputs?".

A stage's output folder carries `fingerprint.json`, written by process 0:

    {"format": 1, "stage": "tokenize", "inputs": {...}, "complete": false | true, "facts": {...}}

`inputs` are what the result depends on: the config values that change it (not those that
only change how it is computed) and digests of the input artifacts. `facts` describe the
finished result where a rerun may ask for more of the same (a train stage's `steps`).

A stage asks `Output.done()` first: complete from these inputs (and facts, and its own check
that the files still load) means nothing to do. A complete output from other inputs is refused
with the changed keys named (`on_other="refuse"`: later stages were built on it) or redone
(`"redo"`: results that are cheap and nothing depends on). Before writing, `begin()` claims the
folder: an unfinished record from other inputs means its partial outputs (checkpoints, shards)
were made from them, so they are removed and a corrected rerun starts clean instead of being
refused. `finish()` marks the folder complete, after its last output.

Room for the next steps: the record is where content checksums of what a stage wrote would be
kept and verified on load, and a per-(workdir, stage) lock would be taken around begin/finish.
"""

import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Optional

from avg_jax import config as config_lib
from avg_jax import processes
from avg_jax.artifacts import io
from avg_jax.errors import UserError

log = logging.getLogger(__name__)

RECORD = "fingerprint.json"
FORMAT = 1


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
  diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
           for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  return "; ".join(diffs[:limit]) + ("; ..." if len(diffs) > limit else "")


def is_complete(directory: str) -> bool:
  """Whether `directory` holds a complete output, whatever it was made from (for readers of
  another stage's output; the stage itself checks its inputs with `Output.done`)."""
  stored = io.read_json(os.path.join(directory, RECORD))
  return bool(stored and stored.get("format") == FORMAT and stored.get("complete"))


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

  def record(self) -> Optional[dict]:
    """The stored record; an unreadable or older one reads as unfinished with unknown inputs."""
    if not os.path.exists(self.path):
      return None
    stored = io.read_json(self.path)
    if stored is None or stored.get("format") != FORMAT:
      return {"inputs": None, "complete": False}
    return stored

  def done(self, verify: Optional[Callable[[], str]] = None, **facts: Any) -> bool:
    """True when the folder is complete from these inputs with these `facts` and
    `verify()` (the stage's own check that its files load) returns "" rather than a problem.
    Raises `UserError` for a complete folder from other inputs under `on_other="refuse"`."""
    stored = self.record()
    if stored is None:
      return False
    if stored.get("inputs") != self.inputs:
      if stored.get("complete") and self.on_other == "refuse":
        raise UserError(f"{self.directory} was made from other inputs "
                        f"({changes(stored.get('inputs'), self.inputs)}); remove it or use "
                        f"another --workdir")
      return False
    if not stored.get("complete"):
      return False
    if any(stored.get("facts", {}).get(k) != canonical(v) for k, v in facts.items()):
      return False
    problem = verify() if verify is not None else ""
    if problem:
      log.warning("%s: %s has a damaged output (%s); redoing it", self.stage, self.directory,
                  problem)
      return False
    return True

  def begin(self) -> None:
    """Claims the folder for these inputs before any output is written (every process calls
    it; process 0 writes). Outputs of other inputs found there are removed first."""
    stored = self.record()
    if processes.is_main():
      if stored is not None and stored.get("inputs") != self.inputs:
        what = "outputs" if stored.get("complete") else "unfinished outputs"
        print(f"{self.stage}: removing the {what} of other inputs in {self.directory} "
              f"({changes(stored.get('inputs'), self.inputs)})")
        shutil.rmtree(self.directory)
      os.makedirs(self.directory, exist_ok=True)
      self._write(self.directory, complete=False, facts={})
    processes.barrier(f"{self.stage}: claimed {self.directory}")

  def finish(self, *, into: Optional[str] = None, **facts: Any) -> None:
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
    io.write_json(os.path.join(directory, RECORD),
                  {"format": FORMAT, "stage": self.stage, "inputs": self.inputs,
                   "complete": complete, "facts": canonical(facts)})
