"""The paper configs name every input path they lack, before any work (avg_jax/stages/inputs.py)."""

import os

import pytest

from avg_jax import cli
from avg_jax import config as config_lib
from avg_jax.errors import UserError
from avg_jax.stages import inputs

PAPER_KEYS = [
  "data.karpathy_json",
  "data.image_root",
  "encoder.pretrained_path",
  "t5.pretrained_path",
  "data.pseudo_queries",
]


@pytest.mark.parametrize("name", ["flickr30k.py", "coco.py:t5-base"])
def test_paper_run_without_paths_names_each_one_and_runs_nothing(repo_root, tmp_path, capsys, name):
  workdir = tmp_path / "w"
  rc = cli.main(["run", "--config", str(repo_root / "configs" / name), "--workdir", str(workdir)])
  assert rc == 2
  err = capsys.readouterr().err.splitlines()
  assert err[0] == "avg-jax: error: 5 input path(s) missing or wrong; nothing was run:"
  assert [line.split(":")[0].strip() for line in err[1:]] == PAPER_KEYS
  for key, line in zip(PAPER_KEYS, err[1:]):
    assert f"not set; pass --config.{key}=<" in line
  assert not workdir.exists()


def _paper(repo_root, tmp_path, *overrides):
  return config_lib.load_config(str(repo_root / "configs/flickr30k.py"), list(overrides))


def _world(tmp_path, spiece=True):
  """Empty stand-ins of every input: existence is all the check looks at."""
  (tmp_path / "images").mkdir()
  (tmp_path / "clip").mkdir()
  (tmp_path / "t5").mkdir()
  for name in ("k.json", "pq.jsonl"):
    (tmp_path / name).write_text("")
  if spiece:
    (tmp_path / "t5" / "spiece.model").write_bytes(b"")
  return [
    f"data.karpathy_json={tmp_path / 'k.json'}",
    f"data.image_root={tmp_path / 'images'}",
    f"encoder.pretrained_path={tmp_path / 'clip'}",
    f"t5.pretrained_path={tmp_path / 't5'}",
    f"data.pseudo_queries={tmp_path / 'pq.jsonl'}",
  ]


def test_complete_inputs_pass_and_wrong_kinds_are_named(repo_root, tmp_path):
  paths = _world(tmp_path)
  inputs.check(_paper(repo_root, tmp_path, *paths))
  swapped = (
    paths[:1]
    + [f"data.image_root={tmp_path / 'k.json'}"]
    + paths[2:4]
    + [f"data.pseudo_queries={tmp_path / 'missing.jsonl'}"]
  )
  assert inputs.problems(_paper(repo_root, tmp_path, *swapped)) == [
    f"data.image_root: {tmp_path / 'k.json'} is not a folder; pass "
    f"--config.data.image_root=<the folder holding the dataset's images>",
    f"data.pseudo_queries: {tmp_path / 'missing.jsonl'} not found; pass --config.data."
    f"pseudo_queries=<{inputs.KNOWN['data.pseudo_queries'][1]}> (or run the inductive "
    f"protocol alone: --config.protocol=inductive --config.evaluate.protocols="
    f"'(\"inductive\",)' --config.evaluate.ablation_protocols='(\"inductive\",)')",
  ]


def test_the_t5_directory_must_hold_its_tokenizer(repo_root, tmp_path):
  paths = _world(tmp_path, spiece=False)
  spiece = os.path.join(tmp_path, "t5", "spiece.model")
  problems = inputs.problems(_paper(repo_root, tmp_path, *paths))
  assert problems == [
    f"text_tokenizer.model_path: {spiece} not found (the text tokenizer of "
    "t5.pretrained_path); pass --config.text_tokenizer.model_path=<the T5's "
    "SentencePiece model>"
  ]
  (tmp_path / "elsewhere.model").write_bytes(b"")
  given = f"text_tokenizer.model_path={tmp_path / 'elsewhere.model'}"
  assert inputs.problems(_paper(repo_root, tmp_path, *paths, given)) == []


def test_pseudo_queries_are_needed_by_the_transductive_protocol_only(repo_root, tmp_path):
  paths = _world(tmp_path)[:4]
  assert [p.split(":")[0] for p in inputs.problems(_paper(repo_root, tmp_path, *paths))] == [
    "data.pseudo_queries"
  ]
  inductive = [
    "protocol=inductive",
    "evaluate.protocols=('inductive',)",
    "evaluate.ablation_protocols=('inductive',)",
  ]
  assert inputs.problems(_paper(repo_root, tmp_path, *paths, *inductive)) == []


def test_smoke_needs_no_inputs_and_unknown_keys_are_errors(repo_root):
  assert inputs.problems(config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"))) == []
  config = config_lib.load_config(
    str(repo_root / "configs/smoke.py:tiny"), ["required_inputs=('t5.nope',)"]
  )
  with pytest.raises(UserError, match="config required_inputs: unknown key 't5.nope'"):
    inputs.check(config)


def test_ahead_of_time_compile_needs_no_paths(repo_root, tmp_path, monkeypatch):
  # `avg-jax compile` builds programs from shapes alone: no data or weights are read.
  from avg_jax.aot import command

  seen = []
  monkeypatch.setattr(command, "run", lambda config, args, argv: seen.append(args.topology))
  assert (
    cli.main(
      ["compile", "--config", str(repo_root / "configs/flickr30k.py"), "--topology", "v5e:4x4"]
    )
    == 0
  )
  assert seen == ["v5e:4x4"]


def test_the_readme_tpu_command_passes_exactly_the_required_paths(repo_root):
  text = (repo_root / "README.md").read_text()
  block = text[text.index("### Reproducing the paper on Cloud TPU") :]
  block = block[block.index("```bash") : block.index("```", block.index("```bash") + 7)]
  keys = [
    part.split("=")[0][len("--config.") :] for part in block.split() if part.startswith("--config.")
  ]
  config = config_lib.load_config(str(repo_root / "configs/flickr30k.py"))
  assert keys == list(config.required_inputs) == PAPER_KEYS
