"""`checksums.json`: a recorded folder verifies until a file changes, shrinks or goes."""

import os

from avg_jax.artifacts import checksums
from helpers import flip_bytes


def test_verify_names_the_changed_file(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "a.bin").write_bytes(bytes(range(256)) * 8)
  (tmp_path / "b.txt").write_text("hello")
  assert not checksums.has_record(str(tmp_path))
  assert checksums.verify(str(tmp_path)).endswith("checksums.json is missing")
  checksums.write(str(tmp_path))
  assert set(checksums.read(str(tmp_path))) == {"b.txt", os.path.join("sub", "a.bin")}
  assert checksums.verify(str(tmp_path)) == ""
  flip_bytes(str(tmp_path / "sub" / "a.bin"))
  assert checksums.verify(str(tmp_path)) == (
      f"{tmp_path}/sub/a.bin does not match its checksum (changed since it was written)")
  (tmp_path / "sub" / "a.bin").write_bytes(b"x")
  assert checksums.verify(str(tmp_path)) == f"{tmp_path}/sub/a.bin has 1 bytes, 2048 were written"
  os.remove(tmp_path / "b.txt")
  assert checksums.verify(str(tmp_path)) == f"{tmp_path}/b.txt is missing"
  (tmp_path / checksums.NAME).write_text("{garbled")
  assert checksums.verify(str(tmp_path)).endswith("checksums.json is unreadable")
