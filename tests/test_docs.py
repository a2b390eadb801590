"""The docs name only what exists: paths, modules and `avg-jax` commands.

Checked: README.md, NOTES.md and the Markdown files at the top level of docs/. Not checked:
docs/notebook/, the dated lab notebook, whose paths, commands and numbers are as of each
entry's date (files have moved since; the records stay as they were measured).

What a doc may not name unless it exists:

- a repository path, in a code span, a fenced code block or a link: a token starting with
  `avg_jax/`, `configs/`, `tests/`, `benchmarks/`, `docs/`, `launch/` or `.ci/` (or one of the
  top-level files) must be a file or folder of the checkout. `tests/x.py::test_name` also needs
  the test (function or class) in that file, `configs/smoke.py:tiny` only the file; `*` globs
  must match something and `{a,b}` lists are expanded. Tokens holding a placeholder (`<...>`,
  `...`) are skipped, and so are workdir paths (`runs/...`, `W/...`), which start with none of
  the prefixes. Links are resolved from the doc's own folder; web links and anchors are skipped.
- a dotted module `avg_jax.x.y` with optional attributes (`avg_jax.x.y.Name.method`): the module
  file must exist and each attribute must be defined in it (read with `ast`, nothing imported);
  `from avg_jax.x import a, b` in a code block checks `a` and `b` too.
- an `avg-jax SUBCOMMAND` (or `python -m avg_jax SUBCOMMAND`) in command position: the
  subcommand must be one the CLI parser knows, and so must the next word where the parser has
  a fixed set (`avg-jax index add`, `avg-jax bench decode`); upper-case placeholders (`STAGE`,
  `NAME`) are skipped. The subcommands come from the parser builder in `avg_jax.cli`, run in a
  subprocess that also checks that building it imports no jax (the CLI must start fast).

`test_the_checker_catches_what_is_missing` runs the checker on a hand-made text, so that it
cannot pass by finding nothing.
"""

import ast
import functools
import glob
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

PATH_PREFIXES = ("avg_jax/", "configs/", "tests/", "benchmarks/", "docs/", "launch/", ".ci/")
TOP_FILES = (
  "README.md",
  "NOTES.md",
  "pyproject.toml",
  "requirements.txt",
  "requirements-reference.txt",
  "requirements-tpu.txt",
)


def checked_docs() -> list[pathlib.Path]:
  return [REPO / "README.md", REPO / "NOTES.md", *sorted((REPO / "docs").glob("*.md"))]


# --- Reading a Markdown file -------------------------------------------------------------------

_FENCE = re.compile(r"^\s*(```|~~~)")
_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def code_and_links(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
  """`([(line number, code text)], [(line number, link target)])`: the lines of code blocks
  (fenced, or indented by 4 spaces: they hold commands too) and the code spans of the prose,
  which may run over a line break within a paragraph (joined with a space)."""
  code, links = [], []
  in_fence = False
  paragraph: list[tuple[int, str]] = []

  def prose(lines):
    if not lines:
      return
    first, joined = lines[0][0], "\n".join(line for _, line in lines)
    for match in _SPAN.finditer(joined):
      number = first + joined.count("\n", 0, match.start())
      code.append((number, " ".join(match.group(2).split())))
    rest = _SPAN.sub(
      lambda m: " " * len(m.group(0).replace("\n", "")) + "\n" * m.group(0).count("\n"), joined
    )
    for match in _LINK.finditer(rest):
      links.append((first + rest.count("\n", 0, match.start()), match.group(1)))

  for number, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      prose(paragraph)
      paragraph = []
      in_fence = not in_fence
    elif in_fence or (line.startswith("    ") and line.strip() and not paragraph):
      code.append((number, line))
    elif not line.strip():
      prose(paragraph)
      paragraph = []
    else:
      paragraph.append((number, line))
  prose(paragraph)
  return code, links


# --- Paths -------------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(
  r"(?<![\w./-])((?:avg_jax|configs|tests|benchmarks|docs|launch|\.ci)/[\w./*{},:\-\[\]]*"
  r"|(?:README|NOTES)\.md|pyproject\.toml|requirements(?:-\w+)?\.txt)"
)


def _expand_braces(path: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", path)
  if not match:
    return [path]
  out = []
  for part in match.group(1).split(","):
    out += _expand_braces(path[: match.start()] + part.strip() + path[match.end() :])
  return out


def _defines(tree: ast.Module, name: str) -> bool:
  """Whether the module's top level (or a class body) defines `name`."""
  return name in _names(tree.body)


def _names(body: list[ast.stmt]) -> set[str]:
  found = set()
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      found.add(node.name)
    elif isinstance(node, ast.Assign):
      for target in node.targets:
        found.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      found.add(node.target.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      found.update((a.asname or a.name).split(".")[0] for a in node.names)
    elif isinstance(node, (ast.If, ast.Try, ast.With)):
      found |= _names(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
      for handler in getattr(node, "handlers", []):
        found |= _names(handler.body)
  return found


@functools.cache
def _parse(path: pathlib.Path) -> ast.Module:
  return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def path_problem(token: str, root: pathlib.Path = REPO) -> str:
  """ "" when the path `token` names exists under `root`, else why not."""
  token = token.rstrip(".,;:)'\"")
  if "<" in token or ">" in token or "..." in token:
    return ""
  test = ""
  if "::" in token:
    token, test = token.split("::", 1)
    test = re.split(r"[\[:]", test)[0]
  token = re.sub(r"(\.py)\[?:.*$", r"\1", token)  # configs/smoke.py:tiny, configs/x.py[:arg]
  for candidate in _expand_braces(token):
    candidate = candidate.rstrip("/") or candidate
    if any(c in candidate for c in "*?["):
      if not glob.glob(str(root / candidate)):
        return f"{candidate}: nothing matches"
      continue
    target = root / candidate
    if not target.exists():
      return f"{candidate}: no such file or folder"
    if test and not (target.suffix == ".py" and _defines(_parse(target), test)):
      return f"{candidate}::{test}: no such test"
  return ""


# --- Modules -----------------------------------------------------------------------------------

_MODULE = re.compile(r"(?<![\w./-])avg_jax(?:\.[A-Za-z_]\w*)+")
_FROM_IMPORT = re.compile(r"\bfrom\s+(avg_jax(?:\.\w+)*)\s+import\s+\(?([\w\s,]+)")


def module_problem(dotted: str, root: pathlib.Path = REPO) -> str:
  """ "" when `avg_jax.a.b[.attr...]` names a module (and attributes defined in it)."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    base = root.joinpath(*parts[:cut])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
      if path.is_file():
        break
    else:
      continue
    rest = parts[cut:]
    if not rest:
      return ""
    body = _parse(path).body
    for depth, name in enumerate(rest):
      if name not in _names(body):
        where = ".".join(parts[: cut + depth])
        if depth == 0 and path.name == "__init__.py":
          return f"{dotted}: {where} has no submodule or name {name!r}"
        return f"{dotted}: {where} defines no {name!r}"
      classes = [n for n in body if isinstance(n, ast.ClassDef) and n.name == name]
      if not classes:
        return ""  # an attribute of a function or value: not followed further
      body = classes[0].body
    return ""
  return f"{dotted}: no module {'.'.join(parts[:2])}"


# --- Commands ----------------------------------------------------------------------------------

_PARSER_SCRIPT = r"""
import argparse, inspect, json, sys
import avg_jax.cli as cli
builders = [
  f for name, f in vars(cli).items()
  if "parser" in name.lower() and inspect.isfunction(f)
  and not any(p.default is p.empty for p in inspect.signature(f).parameters.values())
]
parser = None
for build in builders:
  made = build()
  if isinstance(made, argparse.ArgumentParser):
    parser = made
    break
if parser is None:
  sys.exit("avg_jax.cli has no parser builder (a function named *parser* without arguments)")

def nested(p):
  out = set()
  for action in p._actions:
    if isinstance(action, argparse._SubParsersAction):
      out |= set(action.choices)
    elif not action.option_strings and action.choices:
      out |= {str(c) for c in action.choices}
  return sorted(out)

tree = {}
for action in parser._actions:
  if isinstance(action, argparse._SubParsersAction):
    tree = {name: nested(sub) for name, sub in action.choices.items()}
print(json.dumps({"commands": tree, "jax_imported": "jax" in sys.modules}))
"""


@functools.cache
def cli_commands() -> dict[str, list[str]]:
  """`{subcommand: [its fixed next words]}` from the CLI's own parser (in a subprocess: the
  test process may have imported anything)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
  done = subprocess.run(
    [sys.executable, "-c", _PARSER_SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert not result["jax_imported"], "building the CLI parser imported jax"
  return result["commands"]


_PREFIX_WORDS = {"time", "-v", "env", "exec", "sudo", "/usr/bin/time", "$", "nohup"}
_SEPARATORS = {"&&", "||", ";", "|", "(", "$("}


def _words(code: str) -> list[str]:
  code = code.replace("\\\n", " ")
  try:
    return shlex.split(code, comments=False, posix=True)
  except ValueError:
    return code.split()


def command_problems(code: str, commands: dict[str, list[str]]) -> list[str]:
  """Problems of the `avg-jax ...` commands in command position in `code`."""
  words = _words(code)
  problems = []
  start = True
  i = 0
  while i < len(words):
    word = words[i]
    if word in _SEPARATORS:
      start = True
      i += 1
      continue
    if start and (word in _PREFIX_WORDS or re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", word)):
      i += 1
      continue
    rest = None
    if start and (word == "avg-jax" or word.endswith("/avg-jax")):
      rest = words[i + 1 :]
    elif (
      start
      and re.fullmatch(r"(\S*/)?python[\d.]*", word)
      and words[i + 1 : i + 3] == ["-m", "avg_jax"]
    ):
      rest = words[i + 3 :]
    start = False
    i += 1
    if not rest:
      continue
    sub = rest[0]
    if not re.fullmatch(r"[a-z][a-z0-9_-]*", sub):
      continue  # an option, or a placeholder such as STAGE or COMMAND
    if sub not in commands:
      problems.append(f"avg-jax {sub}: no such command (the CLI has {', '.join(commands)})")
      continue
    following = rest[1] if len(rest) > 1 else ""
    if (
      commands[sub]
      and re.fullmatch(r"[a-z][a-z0-9_-]*", following)
      and following not in commands[sub]
    ):
      problems.append(f"avg-jax {sub} {following}: {sub} takes one of {', '.join(commands[sub])}")
  return problems


# --- One document ------------------------------------------------------------------------------


def problems_in(
  text: str,
  where: pathlib.Path,
  commands: dict[str, list[str]],
  root: pathlib.Path = REPO,
) -> list[str]:
  """Every path, module and command of `text` (a Markdown file at `where`) that does not
  exist, as `line N: why`."""
  code, links = code_and_links(text)
  out = []
  for number, snippet in code:
    for match in _PATH_TOKEN.finditer(snippet):
      problem = path_problem(match.group(1), root)
      if problem:
        out.append(f"line {number}: {problem}")
    for match in _MODULE.finditer(snippet):
      problem = module_problem(match.group(0), root)
      if problem:
        out.append(f"line {number}: {problem}")
    for match in _FROM_IMPORT.finditer(snippet):
      for item in match.group(2).split(","):
        name = item.split()[0] if item.split() else ""
        if name:
          problem = module_problem(f"{match.group(1)}.{name}", root)
          if problem:
            out.append(f"line {number}: {problem}")
    out += [f"line {number}: {p}" for p in command_problems(snippet, commands)]
  for number, target in links:
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      continue
    target = target.split("#")[0]
    resolved = (where.parent / target).resolve()
    if not resolved.exists():
      out.append(f"line {number}: link {target}: no such file or folder")
  return sorted(set(out), key=lambda p: (int(p.split(":")[0].split()[1]), p))


@pytest.mark.parametrize("doc", checked_docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_doc_names_only_what_exists(doc):
  problems = problems_in(doc.read_text(encoding="utf-8"), doc, cli_commands())
  assert not problems, f"{doc.relative_to(REPO)} names what does not exist:\n" + "\n".join(problems)


def test_the_checker_catches_what_is_missing(tmp_path):
  """A hand-made repository and doc: one good and one missing name of each kind."""
  (tmp_path / "avg_jax" / "data").mkdir(parents=True)
  (tmp_path / "avg_jax" / "__init__.py").write_text("")
  (tmp_path / "avg_jax" / "data" / "__init__.py").write_text("")
  (tmp_path / "avg_jax" / "data" / "shapes.py").write_text(
    "class Scene:\n  def draw(self):\n    pass\n\n\ndef generate():\n  pass\n"
  )
  (tmp_path / "tests").mkdir()
  (tmp_path / "tests" / "test_a.py").write_text("def test_one():\n  pass\n")
  (tmp_path / "docs").mkdir()
  doc = tmp_path / "docs" / "guide.md"
  doc.write_text("")
  commands = {"run": [], "index": ["add", "list", "remove"], "bench": ["decode", "train"]}
  good = """
Paths `avg_jax/data/shapes.py`, `tests/test_a.py::test_one`, `avg_jax/data/` and
`avg_jax/data/{shapes,__init__}.py`; `runs/smoke/export` and `<workdir>/prepared/` are skipped.
Modules `avg_jax.data.shapes.generate`, `avg_jax.data.shapes.Scene.draw`, [a link](guide.md).

    avg-jax run --config C --workdir W
    AVG_JAX_NO_PROGRESS=1 .venv/bin/avg-jax index add --model E a.png
    avg-jax bench NAME

```python
from avg_jax.data.shapes import Scene, generate
```
"""
  assert problems_in(good, doc, commands, root=tmp_path) == []
  bad = """
Missing: `avg_jax/data/nope.py`, `tests/test_a.py::test_two`, [gone](../avg_jax/gone.md).
Missing modules: `avg_jax.nope.thing`, `avg_jax.data.shapes.render`,
`avg_jax.data.shapes.Scene.paint`.

```bash
avg-jax frobnicate --workdir W && avg-jax index move --model E
python -m avg_jax bench nonsense
```

```python
from avg_jax.data.shapes import Scene, render
```

A code span over a line break: `avg-jax
unknown --workdir W`.
"""
  problems = problems_in(bad, doc, commands, root=tmp_path)
  assert problems == [
    "line 2: avg_jax/data/nope.py: no such file or folder",
    "line 2: link ../avg_jax/gone.md: no such file or folder",
    "line 2: tests/test_a.py::test_two: no such test",
    "line 3: avg_jax.data.shapes.render: avg_jax.data.shapes defines no 'render'",
    "line 3: avg_jax.nope.thing: avg_jax has no submodule or name 'nope'",
    "line 4: avg_jax.data.shapes.Scene.paint: avg_jax.data.shapes.Scene defines no 'paint'",
    "line 7: avg-jax frobnicate: no such command (the CLI has run, index, bench)",
    "line 7: avg-jax index move: index takes one of add, list, remove",
    "line 8: avg-jax bench nonsense: bench takes one of decode, train",
    "line 12: avg_jax.data.shapes.render: avg_jax.data.shapes defines no 'render'",
    "line 15: avg-jax unknown: no such command (the CLI has run, index, bench)",
  ]


def test_the_cli_parser_is_read_without_jax():
  commands = cli_commands()
  assert {"run", "search", "serve", "index", "bench"} <= set(commands)
  assert {"add", "remove", "list"} <= set(commands["index"])
