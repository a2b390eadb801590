"""Shared by several test modules (importable because pytest puts tests/ on sys.path)."""

# The tiny pipeline without the slower identifier-scheme ablations.
PIPELINE_OVERRIDES = ["evaluate.methods=('two_tower', 'avg', 'avg_ltr')",
                      "evaluate.efficiency_sizes=(100, 400)"]


def pipeline_args(repo_root, workdir) -> list:
  """`avg-jax run` arguments for the tiny pipeline in `workdir`."""
  return ["--config", str(repo_root / "configs" / "smoke.py:tiny"), "--workdir", str(workdir),
          *[f"--config.{o}" for o in PIPELINE_OVERRIDES]]
