"""Writing a large `.npz` with bounded memory: arrays are preallocated `.npy` memmaps filled
row by row, then stored (uncompressed) into the zip and renamed into place atomically."""

import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np


class NpzWriter:
  """Usage:

  with NpzWriter(path, {"ids": (np.int64, (n,)), "emb": (np.float32, (n, d))}) as w:
    w["emb"][i:j] = rows          # writable memmaps
  # on a clean exit `path` appears complete; on an exception nothing is left behind.
  """

  def __init__(self, path: str, arrays: dict[str, tuple[np.dtype, Sequence[int]]]):
    self.path = path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self._tmpdir = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=directory)
    self.arrays = {
      name: np.lib.format.open_memmap(
        os.path.join(self._tmpdir, f"{name}.npy"), mode="w+", dtype=dtype, shape=tuple(shape)
      )
      for name, (dtype, shape) in arrays.items()
    }

  def __getitem__(self, name: str) -> np.memmap:
    return self.arrays[name]

  def __enter__(self) -> "NpzWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        self._finish()
    finally:
      self.arrays.clear()
      shutil.rmtree(self._tmpdir, ignore_errors=True)

  def _finish(self) -> None:
    for array in self.arrays.values():
      array.flush()
    tmp_zip = os.path.join(self._tmpdir, "out.npz")
    # np.load reads a zip of `<name>.npy` members; ZIP_STORED keeps them memory-mappable in
    # size terms and copies the files in streaming chunks (no whole array in memory).
    with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      for name in self.arrays:
        zf.write(os.path.join(self._tmpdir, f"{name}.npy"), arcname=f"{name}.npy")
    os.replace(tmp_zip, self.path)
