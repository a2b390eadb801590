"""Content checksums of a finished folder: `checksums.json`, the size and SHA-256 of every file
in it, written last (atomically) once its files are final, and checked before it is trusted.

Neither orbax nor numpy checks contents: bytes changed in place (a bad disk sector, a bad
copy) load silently as wrong weights or an empty trie. `verify` reads every file once, so it
is I/O-bound: SHA-256 runs at about 1 GB/s, so a t5-large export (~3 GB) adds ~3 s to a load.

    {"format": 1, "files": {"params/d/0a1b...": {"size": 1234, "sha256": "..."}, ...}}
"""

import os
from typing import Optional

from avg_jax.artifacts import io

NAME = "checksums.json"
FORMAT = 1


def _files(folder: str) -> list[str]:
  """Paths relative to `folder` of its files (not the checksums file itself), sorted."""
  out = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), folder)
      if rel != NAME:
        out.append(rel)
  return sorted(out)


def write(folder: str) -> None:
  """Records the size and SHA-256 of every file under `folder` in `folder/checksums.json`."""
  files = {}
  for rel in _files(folder):
    path = os.path.join(folder, rel)
    files[rel] = {"size": os.path.getsize(path), "sha256": io.file_sha256(path)}
  io.write_json(os.path.join(folder, NAME), {"format": FORMAT, "files": files}, sort_keys=True)


def read(folder: str) -> Optional[dict]:
  """`{relative path: {"size", "sha256"}}` recorded for `folder`; None when there is no
  (readable) record."""
  stored = io.read_json(os.path.join(folder, NAME))
  if stored is None or stored.get("format") != FORMAT or not isinstance(stored.get("files"),
                                                                          dict):
    return None
  return stored["files"]


def has_record(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, NAME))


def verify(folder: str) -> str:
  """"" when every recorded file of `folder` is there with its recorded size and SHA-256,
  else one line naming the first file that differs. Files added after the record are not
  checked. A folder without a record is the caller's decision (`has_record`)."""
  if not has_record(folder):
    return f"{os.path.join(folder, NAME)} is missing"
  files = read(folder)
  if files is None:
    return f"{os.path.join(folder, NAME)} is unreadable"
  for rel, want in sorted(files.items()):
    path = os.path.join(folder, rel)
    if not os.path.isfile(path):
      return f"{path} is missing"
    size = os.path.getsize(path)
    if size != want.get("size"):
      return f"{path} has {size} bytes, {want.get('size')} were written"
    if io.file_sha256(path) != want.get("sha256"):
      return f"{path} does not match its checksum (changed since it was written)"
  return ""
