"""Shared by several test modules (importable because pytest puts tests/ on sys.path)."""

# The tiny pipeline without the slower identifier-scheme ablations.
PIPELINE_OVERRIDES = ["evaluate.methods=('two_tower', 'avg', 'avg_ltr')",
                      "evaluate.efficiency_sizes=(100, 400)"]


def pipeline_args(repo_root, workdir) -> list:
  """`avg-jax run` arguments for the tiny pipeline in `workdir`."""
  return ["--config", str(repo_root / "configs" / "smoke.py:tiny"), "--workdir", str(workdir),
          *[f"--config.{o}" for o in PIPELINE_OVERRIDES]]


def largest_file(folder) -> str:
  """The largest file under `folder` (what a damage test flips bytes in)."""
  import os
  sizes = [(os.path.getsize(os.path.join(r, f)), os.path.join(r, f))
           for r, _, files in os.walk(folder) for f in files]
  return max(sizes)[1]


def flip_bytes(path, count=400) -> None:
  """Inverts `count` bytes (at most half the file) in the middle of `path`; the size stays."""
  import os
  size = os.path.getsize(path)
  count = min(count, max(size // 2, 1))
  with open(path, "r+b") as f:
    f.seek((size - count) // 2)
    data = f.read(count)
    f.seek((size - count) // 2)
    f.write(bytes(b ^ 0xFF for b in data))
  assert os.path.getsize(path) == size
