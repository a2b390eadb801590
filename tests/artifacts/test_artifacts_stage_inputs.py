"""The stage-input table (avg_jax/artifacts/stage_inputs.py) against what the stages do.

- every key of every shipped config is declared: an input of some stage, neutral, or a tool's;
- the keys each stage read while the shared tiny pipeline was built (recorded, see
  tests/config_reads.py) are all declared for it;
- changing any key changes the recorded inputs of exactly the stages that read it and of those
  built on them (through the functions the stages themselves call), and keeps the others;
- docs/fingerprints.md is the table these define.
"""

import json
import pathlib

import pytest

from avg_jax import config as config_lib
from avg_jax.artifacts import stage_inputs
from avg_jax.data import prepared
from avg_jax.stages import embed as embed_stage
from avg_jax.stages import tokenize as tokenize_stage
from avg_jax.training import state as state_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TABLE = "avg_jax/artifacts/stage_inputs.py"
DOC = REPO_ROOT / "docs" / "fingerprints.md"
CONFIGS = (
  "base.py",
  "smoke.py",
  "smoke.py:tiny",
  "flickr30k.py",
  "coco.py",
  "karpathy_local.py:tiny",
)


def _load(name):
  if name == "base.py":
    from configs import base

    return base.get_base_config()
  return config_lib.load_config(str(REPO_ROOT / "configs" / name))


def _declared(key: str) -> bool:
  return stage_inputs.is_neutral(key) or any(
    stage_inputs.reads_key(s, key) for s in stage_inputs.STAGES
  )


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_key_is_declared(name):
  config = _load(name)
  missing = [k for k in stage_inputs.leaves(config) if not _declared(k)]
  assert not missing, (
    f"configs/{name}: config key(s) {missing} are declared nowhere in {TABLE}: add each to "
    f"STAGES[<stage>].reads of the stage(s) whose output it can change, or to NEUTRAL if no "
    f"result depends on it (or TOOLS for a section only `avg-jax compile` / `bench` read)"
  )
  rules = [
    k
    for k in config_lib.RULES
    if k not in stage_inputs.leaves(config) and not stage_inputs.is_neutral(k)
  ]
  assert name != "base.py" or not rules, f"RULES keys missing from configs/base.py: {rules}"


def test_every_stage_reads_only_declared_keys(pipeline_workdir, config_reads):
  """The shared pipeline fixtures record every config key each stage reads (conftest.py)."""
  assert set(config_reads.reads) == set(stage_inputs.STAGES), "a stage read no config key?"
  problems = []
  for stage, keys in sorted(config_reads.reads.items()):
    inputs = set(stage_inputs.input_keys(stage, keys))
    for key in sorted(keys - inputs):
      if stage_inputs.is_neutral(key) or stage_inputs._match(
        key, stage_inputs.STAGES[stage].reports
      ):
        continue
      problems.append(
        f"stage {stage} read config key {key}, which is neither its input (nor an earlier "
        f"stage's) nor neutral: in {TABLE}, add {key!r} to STAGES[{stage!r}].reads if it can "
        f"change the {stage} stage's output, to STAGES[{stage!r}].reports if it only changes "
        f"what the stage prints or logs, or to NEUTRAL if no stage's result depends on it"
      )
  assert not problems, "\n".join(problems)


# The functions the stages themselves call to make their records.
def _recorded_inputs(config) -> dict:
  scheme, protocol = str(config.tokenizer.scheme), str(config.protocol)
  return {
    "prepare": prepared.data_identity(config),
    "embed": embed_stage.inputs(config),
    "tokenize": tokenize_stage.inputs(config),
    "train": state_lib.stage_inputs_of(config, None, scheme, protocol, "train"),
    "rank": state_lib.stage_inputs_of(config, None, scheme, protocol, "rank"),
    "evaluate": stage_inputs.inputs("evaluate", config),
    "export": stage_inputs.inputs("export", config),
  }


def _other(value):
  """A value of the same kind that differs from `value`."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value * 2 + 1
  if isinstance(value, str):
    return value + "_changed"
  if isinstance(value, (tuple, list)):
    return type(value)(list(value) + [value[-1] if value else 1])
  return 1.5  # None


def _input_file(folder, key, text="a"):
  """A path for the FILES key `key` whose file(s) exist and hold `text`."""
  names = stage_inputs.FILES[key]
  root = folder / key
  for name in names:
    path = root / name if name else root
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return str(root)


def _changed(config, key, folder):
  c = config_lib.ml_collections.ConfigDict(config.to_dict())
  node, parts = c, key.split(".")
  for part in parts[:-1]:
    node = node[part]
  with node.ignore_type():
    node[parts[-1]] = (
      _input_file(folder, key) if key in stage_inputs.FILES else _other(node[parts[-1]])
    )
  return c


def _expected(key):
  """The stages whose output a change of `key` reaches: those that read it, and later ones
  that are built on their outputs."""
  return {
    s
    for s in stage_inputs.STAGES
    if any(stage_inputs.reads_key(u, key) for u in stage_inputs.closure(s))
  }


def test_a_changed_key_changes_exactly_the_stages_built_on_it(tiny_config, tmp_path):
  config = tiny_config()
  base = _recorded_inputs(config)
  keys = stage_inputs.leaves(config)
  assert set(config_lib.RULES) <= set(keys)
  wrong = []
  for key in sorted(keys):
    now = _recorded_inputs(_changed(config, key, tmp_path))
    changed = {s for s in base if now[s] != base[s]}
    if changed != _expected(key):
      wrong.append(f"{key}: changes {sorted(changed)}, expected {sorted(_expected(key))}")
    # Downstream of a changed stage nothing stays (a stage built on an old output).
    for stage in changed:
      later = {s for s in stage_inputs.STAGES if stage in stage_inputs.closure(s)}
      if not later <= changed:
        wrong.append(f"{key}: changes {stage} but not {sorted(later - changed)}")
  assert not wrong, "\n".join(wrong)


# What a user changing these expects, written out (not derived from the table).
KNOWN = {
  "train.learning_rate": {"train", "rank", "evaluate", "export"},
  "train.steps": {"train", "rank", "evaluate", "export"},
  "seed": {"embed", "tokenize", "train", "rank", "evaluate", "export"},
  "t5.d_model": {"train", "rank", "evaluate", "export"},
  "rank.learning_rate": {"rank", "evaluate", "export"},
  "tokenizer.codebook_size": {"tokenize", "train", "rank", "evaluate", "export"},
  "encoder_train.steps": {"embed", "tokenize", "train", "rank", "evaluate", "export"},
  "data.num_train": set(stage_inputs.STAGES),
  "decode.beam_size": {"evaluate", "export"},
  # train, rank: "learned" (a target more) reaches them through the voken table digest.
  "decode.tie_break": {"evaluate", "export"},
  "evaluate.recall_ks": {"evaluate"},
  "export.max_query_chars": {"export"},
  "train.log_every": set(),
  "train.checkpoint_every": set(),
  "train.eval_every": set(),
  "encoder_train.embed_batch_size": set(),
  "decode.batch_size": set(),
  "mesh.data": set(),
}


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_known_keys(tiny_config, key, tmp_path):
  config = tiny_config()
  base, now = _recorded_inputs(config), _recorded_inputs(_changed(config, key, tmp_path))
  assert {s for s in base if now[s] != base[s]} == KNOWN[key]


@pytest.mark.parametrize("key", sorted(stage_inputs.FILES))
def test_an_input_files_contents_reach_every_stage(tiny_config, key, tmp_path):
  """The same path with other contents (an edited Karpathy JSON): prepare hashes the file,
  and every later stage's record holds that digest."""
  config = _changed(tiny_config(), key, tmp_path)
  before = _recorded_inputs(config)
  _input_file(tmp_path, key, text="b")
  now = _recorded_inputs(config)
  assert {s for s in before if now[s] != before[s]} == set(stage_inputs.STAGES)


def test_doc_table_is_current():
  text = DOC.read_text()
  table = stage_inputs.markdown_table(_load("base.py"))
  assert table in text, (
    f"{DOC.relative_to(REPO_ROOT)} is out of date with {TABLE}: replace "
    f"its table with the output of `.venv/bin/python -m "
    f"avg_jax.artifacts.stage_inputs`"
  )


def test_a_key_added_later_keeps_older_outputs_valid_at_its_old_behaviour(tmp_path):
  from avg_jax.artifacts import fingerprint

  config = _load("smoke.py:tiny")
  for key, old_value in stage_inputs.ADDED_KEYS.items():
    stage = next(s for s in stage_inputs.STAGES if stage_inputs.reads_key(s, key))
    at_old = stage_inputs.inputs(stage, config)
    assert key not in at_old["config"]
    # An output recorded before the key existed (its record lacks the key) is still made
    # from this config; with the key at another value it is not.
    older = {**at_old, "config": {k: v for k, v in at_old["config"].items() if k != key}}
    (tmp_path / fingerprint.RECORD).write_text(
      json.dumps({"format": fingerprint.FORMAT, "complete": True, "inputs": older})
    )
    assert fingerprint.made_from(str(tmp_path), at_old) == ""
    changed = stage_inputs.inputs(stage, config, {key: not old_value})
    assert changed["config"][key] == (not old_value)
    assert {k: v for k, v in changed["config"].items() if k != key} == at_old["config"]
    assert key in fingerprint.made_from(str(tmp_path), changed)
