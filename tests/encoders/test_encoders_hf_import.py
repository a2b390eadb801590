"""Strict Hugging Face import: a tampered safetensors file or config is a UserError naming it."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from avg_jax.encoders import hf_import
from avg_jax.errors import UserError


@pytest.fixture
def clip_dir(repo_root, tmp_path):
  target = tmp_path / "clip"
  shutil.copytree(repo_root / "tests" / "fixtures" / "clip_tiny_a", target)
  return target


def _tamper(directory, fn):
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  fn(tensors)
  save_file(tensors, str(path))


def test_untouched_copy_imports(clip_dir):
  cfg, params = hf_import.load_hf_clip(str(clip_dir))
  assert cfg.vision_layers == 2 and cfg.text_pooling == "argmax"
  assert params["visual_projection"]["kernel"].shape == (cfg.vision_width, cfg.projection_dim)


def test_missing_tensor_is_named(clip_dir):
  _tamper(clip_dir, lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
  name = r"vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"
  with pytest.raises(UserError, match="missing tensor " + name):
    hf_import.load_hf_clip(str(clip_dir))


def test_unexpected_tensor_is_named(clip_dir):
  extra = {"text_model.extra_head.weight": np.zeros((2, 2), np.float32)}
  _tamper(clip_dir, lambda t: t.update(extra))
  with pytest.raises(UserError, match=r"unexpected tensor text_model\.extra_head\.weight"):
    hf_import.load_hf_clip(str(clip_dir))


def test_misshaped_tensor_is_named_with_shapes(clip_dir):
  def shrink(t):
    t["text_projection.weight"] = t["text_projection.weight"][:, :-1].copy()

  _tamper(clip_dir, shrink)
  expected = r"text_projection\.weight has shape \[16, 31\], expected \[16, 32\]"
  with pytest.raises(UserError, match=expected):
    hf_import.load_hf_clip(str(clip_dir))


def test_config_disagreeing_with_weights(clip_dir):
  config = json.loads((clip_dir / "config.json").read_text())
  config["vision_config"]["num_hidden_layers"] = 3
  (clip_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match=r"missing tensor vision_model\.encoder\.layers\.2\."):
    hf_import.load_hf_clip(str(clip_dir))


def test_position_ids_buffers_are_tolerated(clip_dir):
  _tamper(
    clip_dir,
    lambda t: t.update({"text_model.embeddings.position_ids": np.arange(16, dtype=np.int64)[None]}),
  )
  hf_import.load_hf_clip(str(clip_dir))


def test_half_precision_weights_are_upcast(clip_dir):
  _tamper(clip_dir, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
  _, params = hf_import.load_hf_clip(str(clip_dir))
  assert params["text"]["token_embedding"].dtype == np.float32


def test_missing_files_and_bad_model_type(clip_dir, tmp_path):
  with pytest.raises(UserError, match="directory not found"):
    hf_import.load_hf_clip(str(tmp_path / "nope"))
  config = json.loads((clip_dir / "config.json").read_text())
  (clip_dir / "config.json").write_text(json.dumps(dict(config, model_type="siglip")))
  with pytest.raises(UserError, match="model_type 'siglip'"):
    hf_import.load_hf_clip(str(clip_dir))
  (clip_dir / "config.json").write_text(json.dumps(config))
  (clip_dir / "model.safetensors").unlink()
  with pytest.raises(UserError, match="no model.safetensors"):
    hf_import.load_hf_clip(str(clip_dir))


def test_corrupt_safetensors(clip_dir):
  (clip_dir / "model.safetensors").write_bytes(b"\x00\x01garbage")
  with pytest.raises(UserError, match="cannot read safetensors"):
    hf_import.load_hf_clip(str(clip_dir))
