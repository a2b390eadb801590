"""Which config keys each pipeline stage reads: recorded while the stages run.

`ConfigReads.recording()` patches `ml_collections.ConfigDict` for the duration of a block so
that every key read through it (`c.train.steps`, `c["train"]`, `c.get(...)`, iterating a
section) is recorded under the stages running at that moment (`stage_runs` wraps each stage
module's `run`; a stage run inside another, as evaluate runs tokenize, counts for both).
Bulk copies (`to_dict`, which the stages use for metadata and for copies of the config) are
not reads; a config rebuilt from such a copy keeps the dotted paths of its sections, so reads
through it are recorded like reads through the original.

Used by the shared tiny-pipeline fixtures (tests/conftest.py) and checked against the stages'
declared inputs by tests/artifacts/test_artifacts_stage_inputs.py.
"""

import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import ml_collections


class ConfigReads:
  """`reads[stage]`: the set of dotted config keys (leaves) a stage read while recorded."""

  def __init__(self):
    self.reads: dict[str, set[str]] = defaultdict(set)
    self._paths: dict[int, str] = {}  # id of a ConfigDict (or a to_dict copy) -> its path
    self._keep: list[Any] = []  # keeps those objects alive, so ids stay unique
    self._stages: list[str] = []
    self._local = threading.local()  # per-thread depth of bulk copies (not reads)

  def _name(self, obj: Any, path: str) -> None:
    if id(obj) not in self._paths:
      self._paths[id(obj)] = path
      self._keep.append(obj)

  def _name_tree(self, node: Any, path: str) -> None:
    """`node` and every section below it get their paths (a copy of a named config)."""
    self._name(node, path)
    for key, value in node._fields.items():  # pylint: disable=protected-access
      if isinstance(value, ml_collections.ConfigDict):
        self._name_tree(value, f"{path}.{key}" if path else str(key))

  def _bulk(self) -> int:
    return getattr(self._local, "bulk", 0)

  @contextlib.contextmanager
  def recording(self) -> Iterator["ConfigReads"]:
    """Records reads through every config `avg_jax.config.load_config` returns within the
    block (a root) and through copies of it."""
    from avg_jax import config as config_lib

    cls = ml_collections.ConfigDict
    load_config = config_lib.load_config
    original = (cls.__getitem__, cls.to_dict, cls.__init__)
    get_item, to_dict, init = original
    recorder = self

    def recorded_getitem(node, key):
      value = get_item(node, key)
      parent = recorder._paths.get(id(node))
      if parent is None or not isinstance(key, str) or "." in key:
        return value
      path = f"{parent}.{key}" if parent else key
      if isinstance(value, cls):
        recorder._name(value, path)
      elif recorder._bulk() == 0:
        for stage in recorder._stages:
          recorder.reads[stage].add(path)
      return value

    def bulk_to_dict(node, *args, **kwargs):
      recorder._local.bulk = recorder._bulk() + 1
      try:
        result = to_dict(node, *args, **kwargs)
      finally:
        recorder._local.bulk -= 1
      if id(node) in recorder._paths:
        recorder._name(result, recorder._paths[id(node)])
      return result

    def naming_init(node, initial_dictionary=None, *args, **kwargs):
      init(node, initial_dictionary, *args, **kwargs)
      if initial_dictionary is not None and id(initial_dictionary) in recorder._paths:
        recorder._name_tree(node, recorder._paths[id(initial_dictionary)])

    def named_load_config(*args, **kwargs):
      config = load_config(*args, **kwargs)
      recorder._name_tree(config, "")
      return config

    cls.__getitem__, cls.to_dict, cls.__init__ = recorded_getitem, bulk_to_dict, naming_init
    config_lib.load_config = named_load_config
    try:
      yield self
    finally:
      cls.__getitem__, cls.to_dict, cls.__init__ = original
      config_lib.load_config = load_config

  @contextlib.contextmanager
  def stage_runs(self, stage_modules: dict) -> Iterator[None]:
    """Wraps `run` of each `{name: module}` so that reads within it count for that stage."""
    originals = {name: module.run for name, module in stage_modules.items()}
    recorder = self

    def wrapped(name, run):
      def run_recorded(*args, **kwargs):
        recorder._stages.append(name)
        try:
          return run(*args, **kwargs)
        finally:
          recorder._stages.pop()

      return run_recorded

    for name, module in stage_modules.items():
      module.run = wrapped(name, originals[name])
    try:
      yield
    finally:
      for name, module in stage_modules.items():
        module.run = originals[name]
