"""The package's import graph keeps the pipeline readable from the tree (docs/architecture.md).

Three layers: shared foundation modules; libraries in pipeline order; stages and tools on top.
A library may import the foundation and libraries earlier in the pipeline, never a later one,
a stage or a tool; no module import cycle exists anywhere (function-level imports included, as
a lazy import is still a dependency). The graph is read from the source with `ast`, so the
test needs no import side effects and names the offending file.

A dynamic import is an edge too: `importlib.import_module("avg_jax.x")` with a literal name
counts like `import avg_jax.x`, and one built at run time is refused, except in the runners
of DYNAMIC_RUNNERS, which import what their callers name (the reference worker runs
`ReferenceWorker("module:function", ...)`): those names are read from the callers' source,
must exist, and count as the callers' imports.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "avg_jax"

FOUNDATION = {
  "errors",
  "config",
  "partitioning",
  "progress",
  "runtime",
  "vokens",
  "metrics",
  "processes",
  "artifacts",
  "loop",
}
# Libraries in the order data flows through them: each may import only those before it.
# The tools (ahead-of-time compile, benchmarks, cloud helpers) come last: they are libraries
# too, and run stages only through the CLI.
LIBRARIES = [
  "data",
  "encoders",
  "tokenizer",
  "models",
  "decoding",
  "training",
  "evaluation",
  "inference",
  "export",
  "serve",
  "cloud",
  "aot",
  "bench",
]
TOP = {"stages", "cli", "__main__"}
# Modules whose dynamic import runs code their callers name -> the class whose first argument
# is that name, "module:function".
DYNAMIC_RUNNERS = {"avg_jax.bench.reference_worker": "ReferenceWorker"}


def _module_name(path: pathlib.Path) -> str:
  parts = ("avg_jax",) + path.relative_to(PACKAGE).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dynamic_import_name(node: ast.AST) -> ast.expr | None:
  """The name argument of an `importlib.import_module(...)` / `__import__(...)` call."""
  if not isinstance(node, ast.Call) or not node.args:
    return None
  func = node.func
  name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
  return node.args[0] if name in ("import_module", "__import__") else None


def _runner_targets(tree: ast.AST) -> list[str | None]:
  """The first argument of each DYNAMIC_RUNNERS class call: "module:function", or None when
  it is not a literal."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Call):
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      if name in DYNAMIC_RUNNERS.values():
        arg = node.args[0] if node.args else None
        literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
        out.append(arg.value if literal else None)
  return out


def _imports(path: pathlib.Path, module: str, known: set[str]) -> set[str]:
  """Every `avg_jax` module `path` imports; `from a import b` counts as `a.b` when `a.b` is a
  module, else as `a`. A literal dynamic import counts, and so does the module of each
  "module:function" handed to a DYNAMIC_RUNNERS class (the module docstring)."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  tree = ast.parse(path.read_text(), filename=str(path))
  found.update(t.partition(":")[0] for t in _runner_targets(tree) if t)
  for node in ast.walk(tree):
    name = _dynamic_import_name(node)
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
      found.add(name.value)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        candidate = f"{base}.{alias.name}"
        found.add(candidate if candidate in known else base)
  return {name for name in found if name == "avg_jax" or name.startswith("avg_jax.")}


def _graph() -> dict[str, set[str]]:
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  known = set(files)
  return {
    m: {i for i in _imports(p, m, known) if i != m and i != "avg_jax"} for m, p in files.items()
  }


def _top(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
  bad = []
  for module, imported in graph.items():
    src = _top(module)
    for target in imported:
      dst = _top(target)
      if dst == src or src in TOP:
        continue
      if src in FOUNDATION:
        ok = dst in FOUNDATION
      elif src in LIBRARIES:
        ok = dst in FOUNDATION or (dst in LIBRARIES and LIBRARIES.index(dst) < LIBRARIES.index(src))
      else:
        bad.append(f"{module}: top-level folder {src!r} is in no layer of this test")
        continue
      if not ok:
        bad.append(f"{module} imports {target}")
  return sorted(set(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_every_top_level_folder_has_a_layer():
  names = {_top(m) for m in _graph()} - {""}
  assert names <= FOUNDATION | set(LIBRARIES) | TOP, names - (FOUNDATION | set(LIBRARIES) | TOP)


def test_libraries_never_import_a_stage_a_tool_or_a_later_library():
  assert _layer_violations(_graph()) == []


def test_no_import_cycle():
  assert _cycles(_graph()) == []


def test_dynamic_imports_are_edges_the_graph_reads():
  """No import is hidden from the other tests (module docstring): each dynamic import names a
  literal module or sits in a runner, and each runner target exists."""
  files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  hidden, bad_targets, targets = [], [], []
  for module, path in sorted(files.items()):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
      name = _dynamic_import_name(node)
      literal = isinstance(name, ast.Constant) and isinstance(name.value, str)
      if name is not None and not literal and module not in DYNAMIC_RUNNERS:
        hidden.append(f"{module}:{node.lineno}")
    for target in _runner_targets(tree):
      if target is None:
        bad_targets.append(f"{module}: a runner's target is not a literal")
        continue
      targets.append(target)
      target_module, _, function = target.partition(":")
      defined = target_module in files and any(
        isinstance(n, ast.FunctionDef) and n.name == function
        for n in ast.parse(files[target_module].read_text()).body
      )
      if not defined:
        bad_targets.append(f"{module}: {target} names no module-level function of avg_jax")
  assert hidden == []
  assert bad_targets == []
  assert targets  # the benchmarks' reference sides are read (a reader that finds none is broken)


def test_every_pipeline_stage_is_a_module_of_stages_with_run():
  import importlib
  import inspect

  from avg_jax import stages

  for name in stages.PIPELINE:
    module = importlib.import_module(f"avg_jax.stages.{name}")
    assert list(inspect.signature(module.run).parameters)[:2] == ["config", "workdir"], name


def test_the_checks_catch_a_backward_import_and_a_cycle():
  """The rules themselves on a hand-made graph, so a broken checker cannot pass silently."""
  graph = {
    "avg_jax.data.a": {"avg_jax.training.b"},
    "avg_jax.training.b": {"avg_jax.data.a"},
    "avg_jax.models.c": {"avg_jax.stages.train"},
    "avg_jax.stages.train": set(),
  }
  assert _layer_violations(graph) == [
    "avg_jax.data.a imports avg_jax.training.b",
    "avg_jax.models.c imports avg_jax.stages.train",
  ]
  assert _cycles(graph) == [["avg_jax.data.a", "avg_jax.training.b"]]


@pytest.mark.parametrize(
  "source,expected",
  [
    ("from avg_jax.decoding import trie\n", {"avg_jax.decoding.trie"}),
    ("from avg_jax.decoding.trie import VokenTrie\n", {"avg_jax.decoding.trie"}),
    ("from . import trie\n", {"avg_jax.decoding.trie"}),
    ("from ..models import t5\n", {"avg_jax.models.t5"}),
    ("import numpy\n", set()),
    ("importlib.import_module('avg_jax.decoding.trie')\n", {"avg_jax.decoding.trie"}),
    ("w = ReferenceWorker('avg_jax.models.t5:setup', d)\n", {"avg_jax.models.t5"}),
  ],
)
def test_import_reader(tmp_path, source, expected):
  path = tmp_path / "search.py"
  path.write_text(source)
  known = {"avg_jax.decoding.trie", "avg_jax.models.t5", "avg_jax.decoding.search"}
  assert _imports(path, "avg_jax.decoding.search", known) == expected
