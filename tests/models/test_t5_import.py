"""Hugging Face import/export errors and round trips, voken rows, config construction."""

import json
import os
import shutil

import ml_collections
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from avg_jax.errors import UserError
from avg_jax.models import t5, t5_hf, voken_rows
from avg_jax.vokens import VokenVocabulary

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
V10 = os.path.join(FIXTURES, "t5_v1_0")
V11 = os.path.join(FIXTURES, "t5_v1_1")


def _copy(tmp_path, src=V10, name="model"):
  dst = tmp_path / name
  shutil.copytree(src, dst)
  return dst


def _edit_tensors(model_dir, fn):
  file = os.path.join(model_dir, "model.safetensors")
  tensors = load_file(file)
  fn(tensors)
  save_file(tensors, file)


def test_missing_directory_and_files(tmp_path):
  with pytest.raises(UserError, match="config.json not found"):
    t5_hf.load_hf_t5(str(tmp_path / "nope"))
  d = _copy(tmp_path)
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(UserError, match="no model.safetensors.*convert it to safetensors"):
    t5_hf.load_hf_t5(str(d))


def test_bad_config(tmp_path):
  d = _copy(tmp_path)
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-swish"}))
  with pytest.raises(UserError, match="feed_forward_proj 'gated-swish'"):
    t5_hf.load_hf_t5(str(d))
  del cfg["d_kv"]
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UserError, match="lacks d_kv"):
    t5_hf.load_hf_t5(str(d))
  (d / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    t5_hf.load_hf_t5(str(d))


def test_missing_tensor_is_named(tmp_path):
  d = _copy(tmp_path)
  _edit_tensors(d, lambda t: t.pop("decoder.block.2.layer.1.EncDecAttention.k.weight"))
  with pytest.raises(
    UserError,
    match=r"missing tensors: decoder\.block\.2\.layer\.1\."
    r"EncDecAttention\.k\.weight",
  ):
    t5_hf.load_hf_t5(str(d))


def test_extra_tensor_is_named(tmp_path):
  d = _copy(tmp_path)
  _edit_tensors(
    d, lambda t: t.update({"encoder.block.5.layer.0.layer_norm.weight": np.ones(32, np.float32)})
  )
  with pytest.raises(UserError, match=r"unexpected tensors.*encoder\.block\.5\.layer\.0"):
    t5_hf.load_hf_t5(str(d))


def test_misshaped_tensor_is_named(tmp_path):
  d = _copy(tmp_path, V11)
  _edit_tensors(
    d,
    lambda t: t.update(
      {"encoder.block.1.layer.1.DenseReluDense.wi_1.weight": np.zeros((40, 32), np.float32)}
    ),
  )
  with pytest.raises(
    UserError,
    match=r"mis-shaped.*wi_1\.weight has shape \[40, 32\], "
    r"expected \[48, 32\]",
  ):
    t5_hf.load_hf_t5(str(d))


def test_aliases_and_unused_cross_bias_are_accepted(tmp_path):
  d = _copy(tmp_path)

  def add(t):
    t["encoder.embed_tokens.weight"] = t["shared.weight"]
    t["lm_head.weight"] = t["shared.weight"]
    t["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros(
      (32, 4), np.float32
    )

  _edit_tensors(d, add)
  cfg, params = t5_hf.load_hf_t5(str(d))
  assert cfg.tie_embeddings and "output_embedding" not in params


def test_sharded_checkpoint_and_bfloat16(tmp_path):
  d = _copy(tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  os.remove(d / "model.safetensors")
  names = sorted(tensors)
  half = len(names) // 2
  shards = {
    "model-00001-of-00002.safetensors": names[:half],
    "model-00002-of-00002.safetensors": names[half:],
  }
  for file, keys in shards.items():
    save_file({k: tensors[k].astype(ml_dtypes.bfloat16) for k in keys}, str(d / file))
  index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (d / "model.safetensors.index.json").write_text(json.dumps(index))
  cfg, params = t5_hf.load_hf_t5(str(d), param_dtype="bfloat16")
  emb = params["token_embedding"]
  assert emb.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(
    emb.astype(np.float32), tensors["shared.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
  )


@pytest.mark.parametrize("src", [V10, V11])
def test_export_roundtrip(tmp_path, src):
  cfg, params = t5_hf.load_hf_t5(src, scan_layers=True)
  out = tmp_path / "export"
  out.mkdir()
  (out / "stale").write_text("replaced")  # an existing directory is replaced whole
  t5_hf.save_hf_t5(str(out), params, cfg)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  original = load_file(os.path.join(src, "model.safetensors"))
  exported = load_file(str(out / "model.safetensors"))
  assert set(exported) == set(original)
  for name, w in original.items():
    np.testing.assert_array_equal(exported[name], w, err_msg=name)
  cfg2, params2 = t5_hf.load_hf_t5(str(out), scan_layers=True)
  assert cfg2 == cfg
  hf = json.loads((out / "config.json").read_text())
  ref = json.loads(open(os.path.join(src, "config.json")).read())
  ref.setdefault("tie_word_embeddings", True)  # Hugging Face omits defaults
  for key in (
    "d_model",
    "num_layers",
    "num_decoder_layers",
    "feed_forward_proj",
    "tie_word_embeddings",
    "relative_attention_max_distance",
    "vocab_size",
  ):
    assert hf[key] == ref[key], key


def test_export_with_voken_rows_reimports(tmp_path):
  vocab = VokenVocabulary(text_vocab_size=64, codebook_size=5, num_levels=2)
  cfg, params = t5_hf.load_hf_t5(V11)
  codebook = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
  cfg, params = voken_rows.append_voken_rows(params, cfg, vocab, codebook)
  t5_hf.save_hf_t5(str(tmp_path / "m"), params, cfg)
  cfg2, params2 = t5_hf.load_hf_t5(str(tmp_path / "m"), num_voken_tokens=5)
  assert cfg2 == cfg
  np.testing.assert_array_equal(params2["output_embedding"], params["output_embedding"])


# --- voken rows ---------------------------------------------------------------------------------


def test_append_voken_rows_tied():
  vocab = VokenVocabulary(
    text_vocab_size=64, codebook_size=4, num_levels=3, shared_codebook=False, disambiguation_size=2
  )
  cfg, params = t5_hf.load_hf_t5(V10)
  codebook = np.arange(12 * 32, dtype=np.float32).reshape(12, 32) / 100
  new_cfg, new = voken_rows.append_voken_rows(params, cfg, vocab, codebook)
  assert new_cfg.vocab_size == 64 + 14 and new_cfg.num_voken_tokens == 14
  assert new_cfg.first_voken_id == vocab.first_voken_id
  emb = new["token_embedding"]
  np.testing.assert_array_equal(emb[:64], params["token_embedding"])
  np.testing.assert_array_equal(emb[64:76], codebook)
  # Disambiguation rows: random with the text rows' scale, not copies of anything.
  text_std = params["token_embedding"].std()
  assert 0.3 * text_std < emb[76:].std() < 3 * text_std
  # The token id of level 2, code 1 is the codebook row 2 * 4 + 1.
  tok = vocab.codes_to_tokens(np.array([[0, 0, 1, 0]]))[0, 2]
  np.testing.assert_array_equal(emb[tok], codebook[9])


def test_append_voken_rows_untied_scales_output_rows():
  vocab = VokenVocabulary(text_vocab_size=64, codebook_size=6, num_levels=2)
  cfg, params = t5_hf.load_hf_t5(V11)
  codebook = np.random.default_rng(1).standard_normal((6, 32)).astype(np.float32)
  new_cfg, new = voken_rows.append_voken_rows(params, cfg, vocab, codebook)
  np.testing.assert_array_equal(new["token_embedding"][64:], codebook)
  np.testing.assert_allclose(new["output_embedding"][64:], codebook * 32**-0.5, rtol=1e-6)
  assert new["output_embedding"].shape == (70, 32)


def test_codebook_projection_when_dims_differ():
  wide = voken_rows.codebook_projection(8, 32)  # e_dim < d_model: isometry
  np.testing.assert_allclose(wide @ wide.T, np.eye(8), atol=1e-5)
  narrow = voken_rows.codebook_projection(64, 16)  # e_dim > d_model: scaled
  np.testing.assert_allclose(narrow.T @ narrow, np.eye(16) * 4.0, atol=1e-4)
  vocab = VokenVocabulary(text_vocab_size=64, codebook_size=5, num_levels=2)
  cfg, params = t5_hf.load_hf_t5(V10)
  codebook = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
  _, new = voken_rows.append_voken_rows(params, cfg, vocab, codebook)
  rows = new["token_embedding"][64:]
  # Distances between codewords survive the projection.
  d_in = np.linalg.norm(codebook[:, None] - codebook[None], axis=-1)
  d_out = np.linalg.norm(rows[:, None] - rows[None], axis=-1)
  np.testing.assert_allclose(d_out, d_in, atol=1e-4)


def test_voken_row_errors():
  vocab = VokenVocabulary(text_vocab_size=64, codebook_size=5, num_levels=2)
  cfg, params = t5_hf.load_hf_t5(V10)
  with pytest.raises(UserError, match=r"codebook: expected shape \[5, e_dim\]"):
    voken_rows.append_voken_rows(params, cfg, vocab, np.zeros((4, 32), np.float32))
  with pytest.raises(UserError, match="voken_init"):
    voken_rows.append_voken_rows(params, cfg, vocab, None, init="zeros")
  with pytest.raises(UserError, match="text_vocab_size"):
    t5.T5Config.from_config(_section(vocab_size=50), vocab)
  other = VokenVocabulary(text_vocab_size=60, codebook_size=5, num_levels=2)
  with pytest.raises(UserError, match="text-only model with 60 rows"):
    voken_rows.append_voken_rows(params, cfg, other, np.zeros((5, 32), np.float32))


def test_set_voken_rows_random_init():
  vocab = VokenVocabulary(text_vocab_size=20, codebook_size=4, num_levels=2, disambiguation_size=3)
  cfg = t5.T5Config(
    vocab_size=27,
    d_model=8,
    d_kv=4,
    d_ff=16,
    num_heads=2,
    num_encoder_layers=1,
    num_decoder_layers=1,
    num_voken_tokens=7,
    tie_embeddings=False,
  )
  params = t5.init_params(cfg, __import__("jax").random.key(0))
  codebook = np.random.default_rng(3).standard_normal((4, 8)).astype(np.float32)
  new = voken_rows.set_voken_rows(params, cfg, vocab, codebook)
  np.testing.assert_array_equal(np.asarray(new["token_embedding"])[20:24], codebook)
  np.testing.assert_array_equal(new["token_embedding"][:20], params["token_embedding"][:20])
  np.testing.assert_allclose(
    np.asarray(new["output_embedding"])[20:24], codebook * 8**-0.5, rtol=1e-6
  )
  wrong = VokenVocabulary(text_vocab_size=20, codebook_size=4, num_levels=2)
  with pytest.raises(UserError, match="do not match the voken vocabulary"):
    voken_rows.set_voken_rows(params, cfg, wrong, codebook)


# --- config --------------------------------------------------------------------------------------


def _section(**kw):
  from configs import base

  c = base.get_base_config().t5
  c = ml_collections.ConfigDict(c.to_dict())
  c.update(kw)
  return c


def test_from_config_scratch_and_pretrained():
  vocab = VokenVocabulary(text_vocab_size=64, codebook_size=16, num_levels=3, disambiguation_size=4)
  cfg = t5.T5Config.from_config(_section(vocab_size=64, d_model=48, scan_layers=True), vocab)
  assert (cfg.vocab_size, cfg.num_voken_tokens, cfg.d_model) == (84, 20, 48)
  assert cfg.scan_layers and cfg.first_voken_id == 64
  cfg = t5.T5Config.from_config(_section(pretrained_path=V11, dropout_rate=0.2), vocab)
  assert (cfg.d_model, cfg.num_decoder_layers, cfg.feed_forward) == (32, 3, "gated-gelu")
  assert cfg.dropout_rate == 0.2 and not cfg.tie_embeddings
  with pytest.raises(UserError, match="t5.feed_forward"):
    t5.T5Config.from_config(_section(vocab_size=64, feed_forward="swish"), vocab)
