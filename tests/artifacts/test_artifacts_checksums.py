"""`checksums.json`: a recorded folder verifies until a file changes, shrinks or goes."""

import os

from helpers import flip_bytes

from avg_jax.artifacts import checksums


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
    f"{tmp_path}/sub/a.bin does not match its checksum (changed since it was written)"
  )
  (tmp_path / "sub" / "a.bin").write_bytes(b"x")
  assert checksums.verify(str(tmp_path)) == f"{tmp_path}/sub/a.bin has 1 bytes, 2048 were written"
  os.remove(tmp_path / "b.txt")
  assert checksums.verify(str(tmp_path)) == f"{tmp_path}/b.txt is missing"
  (tmp_path / checksums.NAME).write_text("{garbled")
  assert checksums.verify(str(tmp_path)).endswith("checksums.json is unreadable")


def test_add_records_files_as_written_and_check_verifies_the_ones_read(tmp_path):
  folder = str(tmp_path)
  (tmp_path / "a.npz").write_bytes(b"a" * 100)
  (tmp_path / "enc").mkdir()
  (tmp_path / "enc" / "p.bin").write_bytes(b"p" * 50)
  (tmp_path / "fingerprint.json").write_text("{}")  # rewritten by the stage: never recorded
  assert checksums.check(folder, "a.npz") == (
    f"{tmp_path}/a.npz has no checksum in {tmp_path}/checksums.json"
  )
  checksums.add(folder, "a.npz")
  checksums.add(folder, "enc")  # a folder: every file in it
  assert set(checksums.read(folder)) == {"a.npz", os.path.join("enc", "p.bin")}
  assert checksums.check(folder, "a.npz", "enc") == ""
  checksums.write(folder)
  assert "fingerprint.json" not in checksums.read(folder)
  flip_bytes(str(tmp_path / "enc" / "p.bin"), count=4)
  assert checksums.check(folder, "a.npz") == ""  # only what is read is checked
  assert checksums.check(folder, "enc") == (
    f"{tmp_path}/enc/p.bin does not match its checksum (changed since it was written)"
  )
  (tmp_path / "a.npz").write_bytes(b"b" * 100)  # rewritten: recorded again
  checksums.add(folder, "a.npz")
  assert checksums.check(folder, "a.npz") == ""
