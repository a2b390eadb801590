"""How every file and folder avg-jax hands on is written: whole or not at all.

A file is written under a temporary name in its own folder and renamed into place
(`atomic_write`, `atomic_path`, `write_json`, ...): a reader, or a rerun after a crash, sees
the old file, the new one, or none, never half of one. A folder is assembled in a temporary
folder next to it (`temp_dir`, named after this host and process so that a later run can tell
an abandoned one from a live one: `remove_stale_temps`) and moved into place (`replace_dir`).
"""

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np

from avg_jax.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path next to `path` to write to (by any writer that takes a path);
  renames it to `path` when the block ends normally and removes it otherwise."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
  """Calls `write(binary file)` on a temporary file next to `path` (its result is unused),
  then renames it."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())


def write_bytes(path: str, data: bytes) -> None:
  atomic_write(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: str, value: Any, **dump_options: Any) -> None:
  """`value` as JSON (indent 1 unless `dump_options` say otherwise), atomically."""
  dump_options.setdefault("indent", 1)
  write_text(path, json.dumps(value, **dump_options))


def write_npz(path: str, **arrays: Any) -> None:
  """An uncompressed `.npz` of `arrays`, atomically (the name is kept as given)."""
  atomic_write(path, lambda f: np.savez(f, **arrays))


def read_json(path: str) -> dict | None:
  """The JSON object in `path`; None when it is absent, unreadable or not an object."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def read_npz(
  path: str, names: Sequence[str] | None = None, *, remedy: str = ""
) -> dict[str, np.ndarray]:
  """The arrays `names` (default: all) of the `.npz` at `path`, read into memory; a one-line
  `UserError` naming the file (and the missing array), with `remedy` appended, when it is
  missing or cannot be read (a truncated file is a `BadZipFile`)."""
  suffix = f"; {remedy}" if remedy else ""
  if not os.path.isfile(path):
    raise UserError(f"{path} is missing{suffix}")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {name: f[name] for name in (f.files if names is None else names)}
  except KeyError as e:
    raise UserError(f"{path}: missing array {e.args[0]}{suffix}") from e
  except READ_ERRORS as e:
    raise UserError(f"{path}: cannot read ({type(e).__name__}: {_first_line(e)}){suffix}") from e


def read_npy(path: str, *, remedy: str = "") -> np.ndarray:
  """The array in the `.npy` at `path`; a one-line `UserError` like `read_npz`'s."""
  suffix = f"; {remedy}" if remedy else ""
  if not os.path.isfile(path):
    raise UserError(f"{path} is missing{suffix}")
  try:
    return np.load(path, allow_pickle=False)
  except READ_ERRORS as e:
    raise UserError(f"{path}: cannot read ({type(e).__name__}: {_first_line(e)}){suffix}") from e


# What numpy raises for a damaged .npy/.npz: truncated zip members and headers, bad pickles.
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _first_line(e: BaseException) -> str:
  return str(e).splitlines()[0][:200] if str(e) else ""


def _chain(e: BaseException | None) -> Iterator[BaseException]:
  """`e` and the exceptions it was raised from or during, outermost first."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def disk_full(e: BaseException) -> bool:
  """Whether `e` (or an exception it was raised from) is "no space left on device": an
  `OSError` with ENOSPC (or EDQUOT, a full quota), or a wrapped one that kept only the message
  (orbax's and tensorstore's)."""
  return any(
    (isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))
    or "No space left on device" in str(x)
    or "ENOSPC" in str(x)
    for x in _chain(e)
  )


def failed_path(e: BaseException) -> str:
  """The file name of the first `OSError` in `e`'s chain that has one, else ""."""
  for x in _chain(e):
    if isinstance(x, OSError) and x.filename:
      return str(x.filename)
  return ""


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


# --- Folders ---------------------------------------------------------------------------------


def _host() -> str:
  return socket.gethostname().replace("-", "_") or "host"


def _temp_prefix(path: str) -> str:
  # Host and pid in the name: only this host can tell whether the writer is still alive.
  return f"{os.path.basename(path)}.tmp-{_host()}-{os.getpid()}-"


def temp_dir(path: str) -> str:
  """A new empty folder `<path>.tmp-<host>-<pid>-*` next to `path`, to assemble it in."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(prefix=_temp_prefix(path), dir=parent)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_temps(path: str) -> list[str]:
  """Removes the `temp_dir`s of `path` left by this host's processes that are not alive;
  -> their paths. Temp folders of live processes and of other hosts (a shared workdir) are
  left alone (and reported)."""
  removed = []
  for tmp in sorted(glob.glob(glob.escape(path) + ".tmp-*")):
    parts = os.path.basename(tmp).split(".tmp-", 1)[1].split("-")
    if len(parts) < 3 or parts[0] != _host() or not parts[1].isdigit():
      print(f"leaving {tmp}: written by another host or an unknown writer")
      continue
    pid = int(parts[1])
    if pid != os.getpid() and _pid_alive(pid):
      print(f"leaving {tmp}: process {pid} is still running")
      continue
    shutil.rmtree(tmp, ignore_errors=True)
    removed.append(tmp)
  return removed


def publish_dir(tmp: str, path: str) -> bool:
  """Moves the finished folder `tmp` to `path` unless a non-empty `path` exists (then `tmp`
  is left as it is); -> whether it moved. For writers racing on a shared workdir: the first
  one wins and the others can check what it wrote."""
  try:
    os.rename(tmp, path)
  except OSError:
    if not os.path.isdir(path):
      raise
    return False
  return True


def replace_dir(tmp: str, path: str) -> None:
  """Moves the finished folder `tmp` to `path`, replacing what is there: the old folder is
  renamed aside first and removed last, so `path` is always one whole folder or absent."""
  if not os.path.exists(path):
    os.rename(tmp, path)
    return
  old = f"{tmp}.old"
  os.rename(path, old)
  os.rename(tmp, path)
  shutil.rmtree(old, ignore_errors=True)
