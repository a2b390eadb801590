"""Content checksums of a folder's files: `checksums.json`, the size and SHA-256 of each file,
recorded when it is written and checked before it is trusted.

Neither orbax nor numpy checks contents: bytes changed in place (a bad disk sector, a bad
copy) load silently as wrong weights or an empty trie. Two ways to keep the record:

- a folder written whole (a checkpoint step, final parameters, an export, `prepared/`):
  `write` records every file once they are final, `verify` checks them all;
- a stage folder whose files are written one by one (`embed/`, a voken table): `add` records
  the files just written, `check` verifies the ones about to be read.

Checking reads and hashes every byte once: 200-400 MB/s on the 2-core dev machine, so the
smoke run's prepared data (30 MB) takes ~0.15 s and a t5-large export (~3 GB) ~10 s (NOTES.md,
"Checksums: what verification costs").

    {"format": 1, "files": {"params/d/0a1b...": {"size": 1234, "sha256": "..."}, ...}}
"""

import os

from avg_jax.artifacts import io

NAME = "checksums.json"
FORMAT = 1
# Never recorded: the record itself, and a stage folder's fingerprint.json, which the stage
# rewrites after its outputs (avg_jax/artifacts/fingerprint.py).
_UNRECORDED = (NAME, "fingerprint.json")


def _files(folder: str) -> list[str]:
  """Paths relative to `folder` of its files (not the records), sorted."""
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel not in _UNRECORDED:
        out.append(rel)
  return sorted(out)


def _entry(path: str) -> dict:
  return {"size": os.path.getsize(path), "sha256": io.file_sha256(path)}


def write(folder: str) -> None:
  """Records the size and SHA-256 of every file under `folder` in `folder/checksums.json`."""
  files = {rel: _entry(os.path.join(folder, rel)) for rel in _files(folder)}
  io.write_json(os.path.join(folder, NAME), {"format": FORMAT, "files": files}, sort_keys=True)


def add(folder: str, *names: str) -> None:
  """Records `names` (paths relative to `folder`: files, or folders for every file in them)
  as they are now, keeping the record's other entries; a file no longer there is dropped.
  One writer per folder (the stages' process 0)."""
  files = dict(read(folder) or {})
  for name in names:
    path = os.path.join(folder, name)
    for rel in list(files):
      if rel == name or rel.startswith(name.rstrip("/") + "/"):
        del files[rel]
    if os.path.isdir(path):
      files.update(
        {os.path.join(name, rel): _entry(os.path.join(path, rel)) for rel in _files(path)}
      )
    elif os.path.isfile(path):
      files[name] = _entry(path)
  io.write_json(os.path.join(folder, NAME), {"format": FORMAT, "files": files}, sort_keys=True)


def read(folder: str) -> dict | None:
  """`{relative path: {"size", "sha256"}}` recorded for `folder`; None when there is no
  (readable) record."""
  stored = io.read_json(os.path.join(folder, NAME))
  if stored is None or stored.get("format") != FORMAT or not isinstance(stored.get("files"), dict):
    return None
  return stored["files"]


def has_record(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, NAME))


def _problem(path: str, want: dict) -> str:
  if not os.path.isfile(path):
    return f"{path} is missing"
  size = os.path.getsize(path)
  if size != want.get("size"):
    return f"{path} has {size} bytes, {want.get('size')} were written"
  if io.file_sha256(path) != want.get("sha256"):
    return f"{path} does not match its checksum (changed since it was written)"
  return ""


def check(folder: str, *names: str) -> str:
  """ "" when each of `names` (files, or folders: every file recorded under them) matches
  what `add` or `write` recorded, else one line naming the first that differs (a name with
  no record is one: its file was never finished, or the record is gone)."""
  files = read(folder) or {}
  for name in names:
    prefix = name.rstrip("/") + "/"
    recorded = sorted(r for r in files if r == name or r.startswith(prefix))
    if not recorded:
      return f"{os.path.join(folder, name)} has no checksum in {os.path.join(folder, NAME)}"
    for rel in recorded:
      problem = _problem(os.path.join(folder, rel), files[rel])
      if problem:
        return problem
  return ""


def verify(folder: str) -> str:
  """ "" when every recorded file of `folder` is there with its recorded size and SHA-256,
  else one line naming the first file that differs. Files added after the record are not
  checked. A folder without a record is the caller's decision (`has_record`)."""
  if not has_record(folder):
    return f"{os.path.join(folder, NAME)} is missing"
  files = read(folder)
  if files is None:
    return f"{os.path.join(folder, NAME)} is unreadable"
  for rel, want in sorted(files.items()):
    problem = _problem(os.path.join(folder, rel), want)
    if problem:
      return problem
  return ""
