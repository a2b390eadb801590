"""Loading ml_collections configs from `configs/*.py` and applying command-line overrides.

`--config configs/smoke.py:tiny` imports the file and calls `get_config("tiny")` (a relative
path missing from the current directory is read from this checkout's `configs/`); overrides such
as `--config.t5.d_model=256` replace existing fields only: an unknown key is a `UserError`
naming it. The value is parsed with the type of the field it replaces.
"""

import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections

from avg_jax.errors import UserError

# The checkout this package runs from (an editable install): `configs/...` paths that do not
# exist in the current directory are looked up here, so `avg-jax` works from any directory.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def resolve_config_path(path: str) -> str:
  """`path` when it exists; else, for a relative path, the same path under `REPO_ROOT` when
  that exists (e.g. `configs/smoke.py` from another directory); else `path`."""
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  in_repo = os.path.join(REPO_ROOT, path)
  return in_repo if os.path.isfile(in_repo) else path


def _import_config_module(path: str):
  path = resolve_config_path(path)
  if not os.path.isfile(path):
    raise UserError(f"config file not found: {path}")
  # Config files may import their siblings as `configs.base`: put the folder above on the path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "_avg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {path}: syntax error on line {e.lineno}: {e.msg}") from e
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} defines no get_config(arg)")
  return module


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path[:arg]`, applies `overrides` (`key.path=value` strings) and locks the result."""
  path, _, arg = spec.partition(":")
  module = _import_config_module(path)
  try:
    config = module.get_config(arg) if arg else module.get_config(None)
  except (ValueError, KeyError) as e:
    raise UserError(f"config file {path}: bad argument {arg!r}: {e}") from e
  config = ml_collections.ConfigDict(config)
  apply_overrides(config, overrides)
  config.lock()
  return config


def parse_value(key: str, text: str, current: Any) -> Any:
  """Parses `text` into the type of `current` (the value being replaced)."""
  try:
    if isinstance(current, bool):
      lowered = text.strip().lower()
      if lowered in _TRUE:
        return True
      if lowered in _FALSE:
        return False
      raise ValueError("expected true or false")
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, str):
      return text
    if isinstance(current, (tuple, list)):
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return type(current)(value)
    if current is None:
      try:
        return ast.literal_eval(text)
      except (ValueError, SyntaxError):
        return text
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    kind = type(current).__name__
    raise UserError(f"config key {key}: cannot parse {text!r} as {kind}") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `a.b.c=value` overrides in place; unknown keys raise `UserError`."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise UserError(f"config override {item!r}: expected key=value")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f"unknown config key: {'.'.join(parts[:i + 1])}")
      if i < len(parts) - 1:
        node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
      raise UserError(f"config key {key} is a section; override one of its fields")
    with node.unlocked():
      node[parts[-1]] = parse_value(key, text, current)


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """Reads `a.b.c` from `config`, raising `UserError` naming a missing key."""
  node = config
  for i, part in enumerate(dotted.split(".")):
    if part not in node:
      raise UserError(f"config is missing key: {'.'.join(dotted.split('.')[:i + 1])}")
    node = node[part]
  return node


def to_json_dict(config: ml_collections.ConfigDict) -> dict:
  """A plain-dict copy of the config (tuples become lists) for metadata files."""
  return ml_collections.ConfigDict(config).to_dict()
