"""Parity with Hugging Face CLIP (PyTorch) on the golden fixtures of tests/make_clip_fixtures.py:
tokens, preprocessing, image features and text features."""

import numpy as np
import pytest

from avg_jax.encoders import bpe, clip, hf_import, preprocess

FIXTURE_NAMES = ("tiny_a", "tiny_b")


def _fixture(repo_root, name):
  directory = repo_root / "tests" / "fixtures" / f"clip_{name}"
  data = np.load(repo_root / "tests" / "fixtures" / f"clip_{name}.npz")
  return str(directory), data


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_bpe_tokens_match_hf(repo_root, name):
  directory, data = _fixture(repo_root, name)
  tokenizer = bpe.ClipBpeTokenizer.load(directory)
  expected = data["input_ids"]
  got = tokenizer.encode_batch([str(t) for t in data["texts"]], expected.shape[1])
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_preprocessing_matches_hf(repo_root, name):
  directory, data = _fixture(repo_root, name)
  cfg, _ = hf_import.load_hf_clip(directory)
  pre = preprocess.PreprocessConfig.from_hf_dir(directory, cfg.image_size)
  images = [data[f"image_{i}"] for i in range(int(data["num_images"]))]
  # The fixture images are not square and differ from the model size: resize + crop both run.
  assert any(im.shape[0] != im.shape[1] for im in images)
  crops = np.stack([preprocess.resize_and_crop(im, pre) for im in images])
  assert crops.dtype == np.uint8 and crops.shape[1:] == (cfg.image_size, cfg.image_size, 3)
  pixels = np.asarray(preprocess.normalize(crops, pre.mean, pre.std))
  np.testing.assert_allclose(pixels, data["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_features_match_hf(repo_root, name):
  directory, data = _fixture(repo_root, name)
  cfg, params = hf_import.load_hf_clip(directory)
  image_features = np.asarray(clip.encode_images(params, cfg, data["pixel_values"]))
  text_features = np.asarray(clip.encode_texts(params, cfg, data["input_ids"]))
  assert image_features.shape == data["image_features"].shape
  assert text_features.shape == data["text_features"].shape
  np.testing.assert_allclose(image_features, data["image_features"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(text_features, data["text_features"], rtol=0, atol=1e-5)


def test_fixtures_cover_both_poolings_and_patch_sizes(repo_root):
  cfgs = [hf_import.load_hf_clip(_fixture(repo_root, n)[0])[0] for n in FIXTURE_NAMES]
  assert {c.text_pooling for c in cfgs} == {"argmax", "first_eos"}
  assert len({c.patch_size for c in cfgs}) == 2
  assert {c.hidden_act for c in cfgs} == {"quick_gelu", "gelu"}


def test_remat_and_bfloat16_variants(repo_root):
  directory, data = _fixture(repo_root, "tiny_a")
  cfg, params = hf_import.load_hf_clip(directory)
  reference = np.asarray(clip.encode_images(params, cfg, data["pixel_values"]))
  remat = clip.ClipConfig.from_dict(dict(cfg.to_dict(), remat=True))
  np.testing.assert_allclose(
    clip.encode_images(params, remat, data["pixel_values"]), reference, rtol=0, atol=1e-6
  )
  bf16 = clip.ClipConfig.from_dict(dict(cfg.to_dict(), dtype="bfloat16"))
  low = np.asarray(clip.encode_images(params, bf16, data["pixel_values"]))
  assert low.dtype == np.float32
  # bfloat16 keeps ~3 significant digits; features are O(1).
  np.testing.assert_allclose(low, reference, rtol=0, atol=0.1)
  assert not np.array_equal(low, reference)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_text_pooling_without_end_token_or_with_mid_row_pad_matches_hf(repo_root, name):
  # Rows no tokenizer writes (see make_clip_fixtures.edge_ids): no end token, and the config's
  # pad id (1) inside a row. HF pools position 0 without EOS (first-EOS configs) and treats
  # a pad id as an ordinary token.
  directory, data = _fixture(repo_root, name)
  cfg, params = hf_import.load_hf_clip(directory)
  ids = data["edge_input_ids"]
  assert (ids == cfg.pad_token_id).any(axis=1)[1:].all()
  got = np.asarray(clip.encode_texts(params, cfg, ids))
  np.testing.assert_allclose(got, data["edge_text_features"], rtol=0, atol=1e-5)


def test_text_pool_index_follows_hf_rules():
  cfg = clip.ClipConfig(eos_token_id=9, pad_token_id=1)
  tokens = np.array(
    [
      [5, 6, 7, 8],  # no EOS: position 0, as HF (not the last token)
      [5, 1, 9, 0],  # pad id before EOS: still the EOS position
      [5, 9, 1, 9],  # the first EOS
      [5, 6, 1, 1],
    ]
  )  # no EOS, pad-id tail: position 0
  np.testing.assert_array_equal(clip.text_pool_index(cfg, tokens), [0, 2, 1, 0])
  argmax = clip.ClipConfig(text_pooling="argmax", eos_token_id=2)
  np.testing.assert_array_equal(clip.text_pool_index(argmax, tokens), [3, 2, 1, 1])
