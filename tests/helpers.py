"""Shared by several test modules (importable because pytest puts tests/ on sys.path)."""


def fast_compile_xla_flags() -> tuple[str, ...]:
  """XLA flags that make the suite's compiles cheap: it compiles ~3 000 small programs on tiny
  shapes, where how fast the machine code runs matters little. LLVM at -O0 (its passes were
  most of each compile) and XLA:CPU's older loop emitters instead of the MLIR fusion emitters
  (which halve the backend compile again: measured in NOTES.md, "Test suite time"). Both are
  supported code generators of the same XLA; only float rounding may differ, never what a
  test asserts. The emitter flag is named only for the jaxlib it was checked on (0.10): an XLA
  that no longer knows a flag aborts at start-up, and without it the suite is only slower."""
  import importlib.metadata

  flags = ["--xla_backend_optimization_level=0"]
  if importlib.metadata.version("jaxlib").startswith("0.10."):
    flags.append("--xla_cpu_use_fusion_emitters=false")
  return tuple(flags)


def with_fast_compile_flags(xla_flags: str) -> str:
  """`xla_flags` plus each of `fast_compile_xla_flags()` whose option it does not set."""
  flags = xla_flags.split()
  for flag in fast_compile_xla_flags():
    if not any(f.split("=")[0] == flag.split("=")[0] for f in flags):
      flags.append(flag)
  return " ".join(flags)


# XLA flags of a test's subprocess that should see one CPU device, as a user's host does (the
# suite's 8 fake devices only slow its compiles), compiled as cheaply as the suite's own.
ONE_DEVICE_XLA_FLAGS = with_fast_compile_flags("")

# The folder of a persistent XLA compilation cache that only one-device subprocesses share
# (tests/conftest.py creates it per session): the servers, the search CLI and the benchmarks'
# subprocesses compile the same search programs again and again. Never the test processes'
# 8-device programs: one with collectives loaded from the cache by another process can abort
# ("Expected 8 threads to join the rendezvous, but only 7 of them arrived").
ONE_DEVICE_CACHE_ENV = "AVG_JAX_TESTS_ONE_DEVICE_CACHE"


def one_device_env(**extra) -> dict:
  """The environment of a test's subprocess that sees one CPU device, as a user's host does
  (the suite's 8 fake devices only slow its compiles), at the suite's LLVM -O0, sharing the
  session's one-device compilation cache; `extra` variables on top."""
  import os

  env = dict(os.environ, XLA_FLAGS=ONE_DEVICE_XLA_FLAGS, JAX_PLATFORMS="cpu")
  cache = os.environ.get(ONE_DEVICE_CACHE_ENV)
  if cache:
    env.update(one_device_cache_vars(cache))
  env.update(extra)
  return env


def use_one_device_subprocesses(monkeypatch) -> None:
  """Makes the subprocesses that library code starts during a test see `one_device_env`'s
  variables (the test process read its own jax settings at import, so they stay)."""
  import os

  for name, value in one_device_env().items():
    if os.environ.get(name) != value:
      monkeypatch.setenv(name, value)


def one_device_cache_vars(cache: str) -> dict:
  """jax's settings for the shared cache in `cache`. A size bound turns on jax's file lock,
  so a process never reads an entry another one is still writing."""
  return {
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.2",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(2 << 30),
  }


# The tiny pipeline without the slower identifier-scheme ablations. Efficiency at N = 40 (the
# test split alone: no distractors, so AVG's row runs the evaluation's own search program) and
# 100: each other N compiles a search for its trie (measured ~2.8 s of an evaluate's CPU for
# 400 instead of 40).
PIPELINE_OVERRIDES = [
  "evaluate.methods=('two_tower', 'avg', 'avg_ltr')",
  "evaluate.efficiency_sizes=(40, 100)",
]


def pipeline_args(repo_root, workdir) -> list:
  """`avg-jax run` arguments for the tiny pipeline in `workdir`."""
  return [
    "--config",
    str(repo_root / "configs" / "smoke.py:tiny"),
    "--workdir",
    str(workdir),
    *[f"--config.{o}" for o in PIPELINE_OVERRIDES],
  ]


def largest_file(folder) -> str:
  """The largest file under `folder` (what a damage test flips bytes in)."""
  import os

  sizes = [
    (os.path.getsize(os.path.join(r, f)), os.path.join(r, f))
    for r, _, files in os.walk(folder)
    for f in files
  ]
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


def tiny_t5():
  """`(vocab, cfg)`: a 1+1-layer T5 over 2 levels of 4 codes (+3 disambiguation tokens, P = 3),
  for search tests whose answers come from a real model's scores (`tiny_t5_params`)."""
  from avg_jax.models.t5_config import T5Config
  from avg_jax.vokens import VokenVocabulary

  vocab = VokenVocabulary(
    text_vocab_size=21, codebook_size=4, num_levels=2, shared_codebook=False, disambiguation_size=3
  )
  cfg = T5Config(
    vocab_size=vocab.total_vocab_size,
    num_voken_tokens=vocab.num_voken_tokens,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_heads=4,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dropout_rate=0.0,
  )
  return vocab, cfg


def tiny_t5_params(cfg):
  """Random parameters of `tiny_t5`'s model, token embeddings scaled up so beams differ
  clearly."""
  import jax

  from avg_jax.models import t5 as t5_lib

  params = dict(t5_lib.init_params(cfg, jax.random.key(1)))
  params["token_embedding"] = params["token_embedding"] * 4.0
  return params


def load_script(repo_root, name: str, folder: str = "benchmarks"):
  """The module of `<folder>/<name>.py` (benchmark and docs scripts are not a package)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location(name, repo_root / folder / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


class CompileCounter:
  """Counts XLA compilations in a `with` block (`count`): through jax.monitoring's event for
  each backend compile, which every jitted program that misses jax's caches emits."""

  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.count = 0

  def _listen(self, event, duration_secs, **kwargs):
    del duration_secs, kwargs
    if event == self.EVENT:
      self.count += 1

  def __enter__(self) -> "CompileCounter":
    import jax

    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    import jax

    jax.monitoring.unregister_event_duration_listener(self._listen)
