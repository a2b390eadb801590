"""The process settings benchmarks measure under are the ones every product entry applies."""

from avg_jax import cli, runtime
from avg_jax.errors import UserError
from avg_jax.inference.retriever import Retriever


def test_prefer_heap_allocations_takes_on_glibc():
  assert runtime.prefer_heap_allocations() is True  # Linux / glibc, as CI and TPU VMs
  assert runtime.prefer_heap_allocations() is True  # idempotent


def test_cli_and_retriever_apply_it(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(runtime, "prefer_heap_allocations", lambda: calls.append(1) or True)
  # Any command (this one fails on its config, after the process setup).
  assert (
    cli.main(["prepare", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "w")])
    == 2
  )
  assert calls == [1]
  try:
    Retriever.load(str(tmp_path / "missing"))  # the Python API, without the CLI
  except UserError:
    pass
  assert calls == [1, 1]
