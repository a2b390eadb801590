"""Test-wide setup: 8 fake CPU devices for sharding tests, no progress bars, no GPU/TPU; the
shared fixtures (tiny configs and workdirs, a Karpathy-format fixture writer)."""

import gc
import os

from helpers import with_fast_compile_flags  # imports neither jax nor numpy

# Must happen before jax is imported anywhere: sharding tests build (4, 2) and (8,) meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite compiles thousands of small programs on tiny shapes: cheap compiles matter more
# than fast machine code (helpers.fast_compile_xla_flags; inherited by the CLI subprocesses
# the tests start).
os.environ["XLA_FLAGS"] = with_fast_compile_flags(os.environ["XLA_FLAGS"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("AVG_JAX_NO_PROGRESS", "1")
# Tracing and lowering the suite's ~2 000 programs allocates millions of short-lived objects in
# a worker whose heap keeps every compiled program: with the default thresholds (700, 10, 10)
# the cycle collector ran ~6 000 times per worker, its full passes ~0.3 s each, 9 s of CPU per
# worker in all (gc.callbacks, one run). Collecting less often keeps the same memory (peak RSS
# unchanged on tests/decoding and the T5 tests) for ~1 s of collection.
gc.set_threshold(50_000, 20, 20)
# No persistent compilation cache in the test processes: an 8-device CPU program with
# collectives loaded from it by another process (a second test worker, a CLI subprocess) can
# deadlock its devices' threads (XLA aborts: "Expected 8 threads to join the rendezvous, but
# only 7 of them arrived"). One-device subprocesses share one (`helpers.one_device_env`).

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import ONE_DEVICE_CACHE_ENV, pipeline_args  # noqa: E402
from PIL import Image  # noqa: E402

from avg_jax import config as config_lib  # noqa: E402
from avg_jax.stages import prepare  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_configure(config):
  # One cache folder for the whole run: created by the process that starts the xdist workers
  # (before it starts them, so they inherit the variable) and removed when that process ends.
  if hasattr(config, "workerinput") or ONE_DEVICE_CACHE_ENV in os.environ:
    return
  import tempfile

  config._one_device_cache = tempfile.mkdtemp(prefix="avg_jax_tests_one_device_xla_")
  os.environ[ONE_DEVICE_CACHE_ENV] = config._one_device_cache


def pytest_unconfigure(config):
  folder = getattr(config, "_one_device_cache", None)
  if folder:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    os.environ.pop(ONE_DEVICE_CACHE_ENV, None)


# Session fixtures that build the tiny pipeline (minutes of compilation) or start a server on
# it. Under pytest-xdist each worker would build its own copy: the tests that use them form one
# group that a single worker runs (`--dist loadgroup` in launch/local.sh), so they are built once.
# Every other test is grouped with the rest of its file: a file's tests share jitted programs
# (parametrised variants, module-level caches of a single-device result, equal trainer
# settings), which a worker compiles once only when it runs them all. Measured: tests/decoding,
# tests/models, tests/tokenizer and tests/training with two workers used 558 s of CPU grouped
# by file against 666 s test by test (docs/notebook/suite-time.md).
SHARED_PIPELINE_FIXTURES = frozenset(
  {
    "tiny_workdir",
    "pipeline_workdir",
    "serve_export",
    "server",
    "start_server",
    "retriever",
    "config_reads",
  }
)
PIPELINE_GROUP = "tiny_pipeline"


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
  # Marked before any other plugin's hook runs, so that xdist's turns the mark into the group.
  shared = [
    item for item in items if SHARED_PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ()))
  ]
  shared_ids = {id(item) for item in shared}
  groups = {}
  for item in items:
    group = PIPELINE_GROUP if id(item) in shared_ids else item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group(group))
    groups.setdefault(group, []).append(item)
  items[:] = _longest_first(groups)
  result = yield
  # xdist groups by a suffix it writes into the node id; pytest 9 keeps node ids elsewhere, so
  # there the group silently does nothing (each worker builds the pipeline again).
  if (
    getattr(config.option, "loadgroup", False)
    and shared
    and not all(item.nodeid.endswith("@" + PIPELINE_GROUP) for item in shared)
  ):
    raise pytest.UsageError(
      "--dist loadgroup did not group the shared-pipeline tests with this pytest/pytest-xdist "
      "pair (requirements.txt pins one that does)"
    )
  return result


def _longest_first(groups: dict) -> list:
  """The items, group after group, the longest groups first. launch/local.sh passes
  `--no-loadscope-reorder`, so pytest-xdist hands groups out in this order, each to the next
  free worker: with the long ones first, the last groups handed out are short and both workers
  end close together (xdist's own order, by number of tests, would leave single-test files of a
  minute, such as the paper dry run, for the end). Longest: the shared pipeline (minutes), then
  files with a test marked `slow` (ten seconds or more), then the rest by number of tests."""

  def rank(entry):
    group, members = entry
    slow = any(item.get_closest_marker("slow") for item in members)
    return (group != PIPELINE_GROUP, not slow, -len(members))

  return [item for _, members in sorted(groups.items(), key=rank) for item in members]


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO_ROOT


@pytest.fixture(scope="session")
def config_reads():
  """The config keys each stage read while `tiny_workdir` and `pipeline_workdir` were built
  (tests/config_reads.py; checked by tests/artifacts/test_artifacts_stage_inputs.py)."""
  from config_reads import ConfigReads

  return ConfigReads()


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, config_reads) -> pathlib.Path:
  """A workdir with the tiny config's prepare, embed and tokenize stages done (read-only:
  copy it before running stages that write)."""
  from avg_jax import cli

  workdir = tmp_path_factory.mktemp("tiny") / "work"
  config = str(REPO_ROOT / "configs" / "smoke.py:tiny")
  with config_reads.recording(), config_reads.stage_runs(cli.stage_modules()):
    for stage in ("prepare", "embed", "tokenize"):
      assert cli.main([stage, "--config", config, "--workdir", str(workdir)]) == 0, stage
  return workdir


@pytest.fixture(scope="session")
def pipeline_workdir(repo_root, tiny_workdir, tmp_path_factory, config_reads) -> pathlib.Path:
  """`avg-jax run` of the tiny config (one process, 8 fake devices) on a copy of
  `tiny_workdir`."""
  import shutil

  from avg_jax import cli

  workdir = tmp_path_factory.mktemp("pipeline") / "w"
  shutil.copytree(tiny_workdir, workdir)
  with config_reads.recording(), config_reads.stage_runs(cli.stage_modules()):
    assert cli.main(["run", *pipeline_args(repo_root, workdir)]) == 0
  return workdir


@pytest.fixture(scope="session")
def serve_export(pipeline_workdir, tmp_path_factory) -> pathlib.Path:
  """The tiny pipeline's export (with its gallery), copied so other tests may rewrite theirs."""
  import shutil

  target = tmp_path_factory.mktemp("serve") / "export"
  shutil.copytree(pipeline_workdir / "export", target)
  return target


SMOKE_CONFIG = REPO_ROOT / "configs" / "smoke.py"


@pytest.fixture(scope="session")
def tiny_config():
  """`load(*overrides)`: configs/smoke.py:tiny with `key=value` overrides."""

  def load(*overrides):
    return config_lib.load_config(f"{SMOKE_CONFIG}:tiny", overrides)

  return load


@pytest.fixture(scope="session")
def prepared_workdir(tmp_path_factory, tiny_config):
  """A workdir prepared once with configs/smoke.py:tiny (240/40/40 images, 32 px)."""
  workdir = tmp_path_factory.mktemp("prepared_tiny")
  prepare.run(tiny_config(), str(workdir))
  return str(workdir)


RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def _stripes(width, height, vertical):
  """Green | red | blue bands (red is the middle half), across the longer side."""
  image = np.zeros((height, width, 3), np.uint8)
  long_side = width if vertical else height
  a, b = long_side // 4, 3 * long_side // 4
  for lo, hi, color in ((0, a, GREEN), (a, b, RED), (b, long_side, BLUE)):
    if vertical:
      image[:, lo:hi] = color
    else:
      image[lo:hi, :] = color
  return image


def _sentences(n, tag):
  return [
    {"raw": f" a photo number {k} of {tag} ", "tokens": [], "imgid": 0, "sentid": k}
    for k in range(n)
  ]


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>\n'


def write_fixture(
  root, *, corrupt=False, truncated=False, missing=False, short=False, svg=False, empty=False
):
  """Writes images + a Karpathy JSON under `root`; returns (json_path, image_root).

  Each flag adds one bad entry: corrupt (broken.jpg, not an image), truncated (cut.jpg), missing
  (gone.png), short (few.png, 2 captions), svg (logo.svg, and drawing.png: SVG text under a
  PNG name), empty (zero.png, 0 bytes)."""
  images_dir = root / "images"
  (images_dir / "train2014").mkdir(parents=True)
  (images_dir / "val2014").mkdir()
  Image.fromarray(_stripes(60, 20, vertical=True)).save(images_dir / "train2014" / "a.png")
  Image.fromarray(_stripes(20, 60, vertical=False)).save(
    images_dir / "val2014" / "b.jpg", quality=95
  )
  Image.fromarray(np.full((24, 24, 3), 200, np.uint8)).save(images_dir / "c.png")
  Image.fromarray(np.full((30, 40), 90, np.uint8)).save(images_dir / "d.jpg")  # grey (L)
  Image.fromarray(np.full((16, 16, 3), 10, np.uint8)).save(images_dir / "e.png")
  records = [
    {
      "filename": "a.png",
      "filepath": "train2014",
      "imgid": 10,
      "split": "train",
      "sentences": _sentences(5, "a"),
    },
    {
      "filename": "b.jpg",
      "filepath": "val2014",
      "imgid": 11,
      "split": "restval",
      "sentences": _sentences(6, "b"),
    },
    {"filename": "c.png", "imgid": 12, "split": "val", "sentences": _sentences(5, "c")},
    {"filename": "d.jpg", "imgid": 13, "split": "test", "sentences": _sentences(5, "d")},
    {"filename": "e.png", "imgid": 14, "split": "test", "sentences": _sentences(5, "e")},
  ]
  if corrupt:
    (images_dir / "broken.jpg").write_bytes(b"this is not an image")
    records.append(
      {
        "filename": "broken.jpg",
        "imgid": 15,
        "split": "train",
        "sentences": _sentences(5, "broken"),
      }
    )
  if truncated:
    Image.fromarray(_stripes(64, 64, True)).save(images_dir / "full.jpg", quality=95)
    data = (images_dir / "full.jpg").read_bytes()
    (images_dir / "cut.jpg").write_bytes(data[: len(data) // 2])
    records.append(
      {"filename": "cut.jpg", "imgid": 16, "split": "test", "sentences": _sentences(5, "cut")}
    )
  if missing:
    records.append(
      {"filename": "gone.png", "imgid": 17, "split": "val", "sentences": _sentences(5, "gone")}
    )
  if short:
    Image.fromarray(np.full((16, 16, 3), 60, np.uint8)).save(images_dir / "few.png")
    records.append(
      {"filename": "few.png", "imgid": 18, "split": "train", "sentences": _sentences(2, "few")}
    )
  if svg:
    (images_dir / "logo.svg").write_bytes(SVG)
    (images_dir / "drawing.png").write_bytes(SVG)
    records += [
      {"filename": name, "imgid": imgid, "split": "train", "sentences": _sentences(5, name)}
      for imgid, name in ((19, "logo.svg"), (20, "drawing.png"))
    ]
  if empty:
    (images_dir / "zero.png").write_bytes(b"")
    records.append(
      {"filename": "zero.png", "imgid": 21, "split": "val", "sentences": _sentences(5, "zero")}
    )
  json_path = root / "dataset_test.json"
  json_path.write_text(json.dumps({"dataset": "fixture", "images": records}))
  return str(json_path), str(images_dir)


@pytest.fixture
def karpathy_files():
  """`write(root, corrupt=, truncated=, missing=, short=, svg=, empty=) -> (json_path,
  image_root)`."""
  return write_fixture
