"""NpzWriter: a complete .npz on success, nothing left behind on failure."""

import os

import numpy as np
import pytest

from avg_jax.artifacts.npz_writer import NpzWriter


def test_writes_loadable_npz(tmp_path):
  path = str(tmp_path / "out.npz")
  with NpzWriter(path, {"ids": (np.int64, (5,)), "emb": (np.float32, (5, 3))}) as w:
    for start in range(0, 5, 2):
      w["ids"][start : start + 2] = np.arange(start, min(start + 2, 5)) * 10
      w["emb"][start : start + 2] = start
  with np.load(path) as f:
    np.testing.assert_array_equal(f["ids"], [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(f["emb"][:, 0], [0, 0, 2, 2, 4])
    assert f["emb"].dtype == np.float32
  assert os.listdir(tmp_path) == ["out.npz"]


def test_failure_leaves_nothing(tmp_path):
  path = str(tmp_path / "out.npz")
  with pytest.raises(RuntimeError):
    with NpzWriter(path, {"ids": (np.int64, (5,))}) as w:
      w["ids"][:2] = 1
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == []
