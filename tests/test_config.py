"""Config loading, overrides and unknown keys."""

import pytest

from avg_jax import config as config_lib
from avg_jax.errors import UserError


def test_smoke_and_tiny_load(repo_root):
  default = config_lib.load_config(str(repo_root / "configs/smoke.py"))
  tiny = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"))
  assert tiny.data.num_train < default.data.num_train
  # The codebook initialises voken embeddings, so its width must equal the model's.
  for c in (default, tiny):
    assert c.tokenizer.e_dim == c.t5.d_model


@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_paper_configs_load(repo_root, name):
  c = config_lib.load_config(str(repo_root / f"configs/{name}.py"))
  assert c.tokenizer.codebook_size == 1024 and c.tokenizer.num_levels == 4
  assert c.tokenizer.e_dim == c.t5.d_model


def test_overrides_are_typed(repo_root):
  c = config_lib.load_config(
    str(repo_root / "configs/smoke.py:tiny"),
    [
      "t5.d_model=256",
      "train.learning_rate=3e-4",
      "tokenizer.shared_codebook=false",
      "tokenizer.hidden_dims=(8, 4)",
      "data.karpathy_json=/x/y.json",
    ],
  )
  assert c.t5.d_model == 256 and isinstance(c.t5.d_model, int)
  assert c.train.learning_rate == pytest.approx(3e-4)
  assert c.tokenizer.shared_codebook is False
  assert tuple(c.tokenizer.hidden_dims) == (8, 4)
  assert c.data.karpathy_json == "/x/y.json"


@pytest.mark.parametrize(
  "override, message",
  [
    ("t5.d_modle=256", "unknown config key: t5.d_modle"),
    ("nosuch.key=1", "unknown config key: nosuch"),
    ("t5.d_model=big", "config key t5.d_model: cannot parse 'big' as int"),
    ("t5=1", "config key t5 is a section"),
    ("t5.d_model", "expected key=value"),
  ],
)
def test_bad_overrides_name_the_key(repo_root, override, message):
  with pytest.raises(UserError, match=message):
    config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"), [override])


def test_locked_config_rejects_new_keys(repo_root):
  c = config_lib.load_config(str(repo_root / "configs/smoke.py:tiny"))
  with pytest.raises(AttributeError):
    c.t5.new_field = 1


def test_missing_config_file_and_bad_arg(repo_root, tmp_path):
  with pytest.raises(UserError, match="config file not found: .*nope.py"):
    config_lib.load_config(str(tmp_path / "nope.py"))
  with pytest.raises(UserError, match="bad argument 'huge'"):
    config_lib.load_config(str(repo_root / "configs/smoke.py:huge"))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg)\n")
  with pytest.raises(UserError, match="broken.py: syntax error on line 1"):
    config_lib.load_config(str(broken))


def test_config_paths_do_not_depend_on_the_current_directory(repo_root, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = config_lib.load_config("configs/smoke.py:tiny")  # the checkout's, from elsewhere
  assert c.data.num_train == 240
  (tmp_path / "configs").mkdir()  # a file in the current directory still comes first
  (tmp_path / "configs" / "smoke.py").write_text(
    "from configs import base\n"
    "def get_config(arg):\n  c = base.get_base_config()\n  c.seed = 7\n  return c\n"
  )
  (tmp_path / "configs" / "base.py").write_text((repo_root / "configs/base.py").read_text())
  assert config_lib.load_config("configs/smoke.py").seed == 7
  with pytest.raises(UserError, match="config file not found: configs/nope.py"):
    config_lib.load_config("configs/nope.py")


def test_cli_default_config_from_another_directory(tmp_path):
  # Was "config file not found: configs/smoke.py" outside the checkout; now the default
  # config loads and the bad override is what the one-line error names.
  import subprocess
  import sys

  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "avg_jax",
      "prepare",
      "--workdir",
      str(tmp_path / "w"),
      "--config.data.name=nope",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == (
    "avg-jax: error: config data.name: unknown dataset 'nope' "
    "(expected one of avg_shapes, karpathy, emoji)"
  )


def test_karpathy_local_config(repo_root, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = config_lib.load_config("configs/karpathy_local.py")
  assert c.data.name == "karpathy" and c.data.captions_per_image == 1
  assert not c.data.skip_bad_images and c.data.karpathy_json == ""
  assert c.t5.vocab_size >= c.text_tokenizer.vocab_size
  smoke = config_lib.load_config("configs/smoke.py")
  assert (c.t5.d_model, c.encoder.vision_width) == (smoke.t5.d_model, smoke.encoder.vision_width)
  tiny = config_lib.load_config("configs/karpathy_local.py:tiny,captions=5")
  assert tiny.data.captions_per_image == 5 and tiny.t5.d_model == 32
  for arg in ("huge", "captions=0", "captions=x", "captions"):
    with pytest.raises(UserError, match=rf"karpathy_local.py: bad argument '{arg}': expected"):
      config_lib.load_config(f"configs/karpathy_local.py:{arg}")


@pytest.mark.parametrize(
  "command, override, key",
  [
    ("train", "train.steps=-5", "train.steps"),
    ("train", "train.steps=0", "train.steps"),
    ("train", "train.batch_size=0", "train.batch_size"),
    ("train", "train.learning_rate=0", "train.learning_rate"),
    ("train", "train.learning_rate=-1e-3", "train.learning_rate"),
    ("train", "train.warmup_fraction=1.5", "train.warmup_fraction"),
    ("train", "train.checkpoint_every=-1", "train.checkpoint_every"),
    ("train", "train.temperature=nan", "train.temperature"),
    ("rank", "rank.beam_size=0", "rank.beam_size"),
    ("export", "decode.beam_size=0", "decode.beam_size"),
    ("export", "decode.top_k=-1", "decode.top_k"),
    ("export", "export.batch_buckets=()", "export.batch_buckets"),
    ("evaluate", "evaluate.recall_ks=(1, 0)", "evaluate.recall_ks"),
    ("tokenize", "tokenizer.codebook_size=0", "tokenizer.codebook_size"),
    ("tokenize", "tokenizer.num_levels=0", "tokenizer.num_levels"),
    ("tokenize", "tokenizer.dropout=1.0", "tokenizer.dropout"),
    ("tokenize", "tokenizer.hidden_dims=(64, 0)", "tokenizer.hidden_dims"),
    ("embed", "encoder.patch_size=0", "encoder.patch_size"),
    ("embed", "encoder.vision_heads=3", "encoder.vision_width"),
    ("embed", "encoder_train.batch_size=-8", "encoder_train.batch_size"),
    ("prepare", "data.num_train=0", "data.num_train"),
    ("prepare", "data.jpeg_quality=101", "data.jpeg_quality"),
    ("prepare", "loader.read_threads=0", "loader.read_threads"),
    ("run", "t5.d_model=0", "t5.d_model"),
    ("run", "distributed.process_id=1", "distributed.process_id"),
  ],
)
def test_bad_values_stop_every_command_before_any_work(
  repo_root, tmp_path, capsys, command, override, key
):
  from avg_jax import cli

  workdir = tmp_path / "w"
  rc = cli.main(
    [
      command,
      "--config",
      str(repo_root / "configs/smoke.py:tiny"),
      "--workdir",
      str(workdir),
      f"--config.{override}",
    ]
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2
  assert len(err) == 1 and err[0].startswith(f"avg-jax: error: config key {key}: "), err
  assert not workdir.exists()


def test_good_edge_values_pass(repo_root):
  # 0 where it means "none / never / only at the end", 1 for fractions and weights.
  config_lib.load_config(
    str(repo_root / "configs/smoke.py:tiny"),
    [
      "train.eval_every=0",
      "train.checkpoint_every=0",
      "train.warmup_fraction=1.0",
      "rank.rank_weight=0.0",
      "train.grad_clip_norm=0.0",
      "encoder_train.steps=0",
      "export.thumbnail_size=0",
      "tokenizer.dropout=0.0",
      "train.eval_max_queries=0",
    ],
  )


def test_bench_and_compile_validate_too(repo_root, capsys):
  from avg_jax import cli

  for argv in (["bench", "train", "--quick"], ["compile", "--topology", "v5e:4x4"]):
    rc = cli.main(
      [*argv, "--config", str(repo_root / "configs/smoke.py:tiny"), "--config.train.batch_size=0"]
    )
    assert rc == 2
    assert "config key train.batch_size: must be an integer >= 1, got 0" in capsys.readouterr().err
