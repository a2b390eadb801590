"""Test-wide setup: 8 fake CPU devices for sharding tests, no progress bars, no GPU/TPU."""

import os

# Must happen before jax is imported anywhere: sharding tests build (4, 2) and (8,) meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("AVG_JAX_NO_PROGRESS", "1")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from helpers import pipeline_args  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir with the tiny config's prepare, embed and tokenize stages done (read-only:
  copy it before running stages that write)."""
  from avg_jax import cli
  workdir = tmp_path_factory.mktemp("tiny") / "work"
  config = str(REPO_ROOT / "configs" / "smoke.py:tiny")
  for stage in ("prepare", "embed", "tokenize"):
    assert cli.main([stage, "--config", config, "--workdir", str(workdir)]) == 0, stage
  return workdir


@pytest.fixture(scope="session")
def pipeline_workdir(repo_root, tiny_workdir, tmp_path_factory) -> pathlib.Path:
  """`avg-jax run` of the tiny config (one process, 8 fake devices) on a copy of
  `tiny_workdir`."""
  import shutil
  from avg_jax import cli
  workdir = tmp_path_factory.mktemp("pipeline") / "w"
  shutil.copytree(tiny_workdir, workdir)
  assert cli.main(["run", *pipeline_args(repo_root, workdir)]) == 0
  return workdir
