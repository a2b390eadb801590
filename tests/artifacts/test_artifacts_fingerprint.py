"""The one "complete, and made from these inputs?" scheme every stage uses."""

import json
import os

import pytest

from avg_jax.artifacts import fingerprint
from avg_jax.errors import UserError

INPUTS = {"model": {"width": 8, "layers": (2, 2)}, "data": "abc"}


def _out(tmp_path, inputs=INPUTS, on_other="refuse"):
  return fingerprint.Output(str(tmp_path / "stage"), inputs, stage="test", on_other=on_other)


def test_lifecycle_absent_started_complete(tmp_path):
  out = _out(tmp_path)
  assert not out.done()  # nothing there
  out.begin()
  (tmp_path / "stage" / "part").write_text("x")
  assert not out.done()  # claimed, not finished: redo (resume)
  out.begin()  # the same inputs keep the partial outputs
  assert (tmp_path / "stage" / "part").exists()
  out.finish(steps=3)
  assert out.done() and out.done(steps=3)
  assert not out.done(steps=4)  # asked for more of the same: not done
  assert fingerprint.is_complete(out.directory)
  with open(out.path) as f:  # tuples stored as they read back
    assert json.load(f)["inputs"]["model"]["layers"] == [2, 2]


def test_other_inputs_refused_when_complete_and_cleared_when_unfinished(tmp_path):
  _out(tmp_path).begin()
  (tmp_path / "stage" / "checkpoint").write_text("from the old inputs")
  other = _out(tmp_path, dict(INPUTS, model={"width": 16, "layers": (2, 2)}))
  assert not other.done()  # an unfinished run never blocks another
  other.begin()
  assert not (tmp_path / "stage" / "checkpoint").exists()  # its partial outputs are gone
  other.finish()
  with pytest.raises(UserError, match=r"made from other inputs \(model.width: 16 -> 8\)"):
    _out(tmp_path).done()


def test_redo_policy_and_damaged_outputs(tmp_path):
  _out(tmp_path).begin()
  (tmp_path / "stage" / "part").write_text("old result")
  _out(tmp_path).finish()
  redo = _out(tmp_path, {"config": "new"}, on_other="redo")
  assert not redo.done()  # complete from other inputs: redone
  redo.begin()
  assert not os.path.exists(os.path.join(redo.directory, "part"))
  redo.finish()
  assert redo.done(verify=lambda: "")
  assert not redo.done(verify=lambda: "results.json unreadable")


def test_unreadable_or_older_records_are_unfinished_with_unknown_inputs(tmp_path):
  os.makedirs(tmp_path / "stage")
  (tmp_path / "stage" / fingerprint.RECORD).write_text('{"tokenizer": {}, "seed": 0}')
  out = _out(tmp_path)
  assert not out.done() and not fingerprint.is_complete(out.directory)
  out.begin()  # cleared: made by an older avg-jax
  out.finish()
  assert out.done()


def test_digest_and_changes():
  assert fingerprint.digest({"a": 1, "b": (1, 2)}) == fingerprint.digest({"b": [1, 2], "a": 1})
  assert len(fingerprint.digest({})) == 16
  assert fingerprint.changes({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 3}) == (
    "a.b: 1 -> 2; c: 2 -> '<unset>'; d: '<unset>' -> 3"
  )


def test_require_names_the_changed_keys_and_what_to_run(tmp_path):
  made = {"config": {"train.learning_rate": 0.001, "train.steps": 40}, "files": {}}
  out = fingerprint.Output(str(tmp_path / "train"), dict(made, voken_table="ab"), stage="train")
  fingerprint.require(out.directory, made, stage="train", remedy="rerun x")  # no record: the
  out.begin()  # reader's loading says what lacks
  with pytest.raises(UserError, match=r"^no complete train output in .*/train; rerun x$"):
    fingerprint.require(out.directory, made, stage="train", remedy="rerun x")
  out.finish()
  fingerprint.require(out.directory, made, stage="train", remedy="rerun x")  # the stage's own
  assert fingerprint.made_from(out.directory, made) == ""  # extras not compared
  other = {"config": {"train.learning_rate": 0.5, "train.steps": 40}, "files": {}}
  with pytest.raises(
    UserError,
    match=(
      r"^.*/train was made from other inputs than this config's "
      r"\(config.train.learning_rate: 0.001 -> 0.5\); rerun `avg-jax train`$"
    ),
  ):
    fingerprint.require(out.directory, other, stage="train", remedy="rerun `avg-jax train`")
