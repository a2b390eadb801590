"""Parity with PyTorch transformers' T5 on golden fixtures (tests/make_t5_fixtures.py)."""

import json
import os

import jax
import numpy as np
import pytest

from avg_jax.models import t5, t5_hf, voken_rows
from avg_jax.models.t5_layers import relative_position_buckets
from avg_jax.vokens import VokenVocabulary

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")
TOL = 1e-5


def _golden(variant):
  return dict(np.load(os.path.join(FIXTURES, f"t5_{variant}_golden.npz")))


def _load(variant, **overrides):
  return t5_hf.load_hf_t5(os.path.join(FIXTURES, f"t5_{variant}"), **overrides)


@pytest.mark.parametrize(
  "variant,feed_forward,tied", [("v1_0", "relu", True), ("v1_1", "gated-gelu", False)]
)
def test_config_from_hf(variant, feed_forward, tied):
  cfg, params = _load(variant)
  assert cfg.feed_forward == feed_forward and cfg.tie_embeddings == tied
  assert (cfg.num_encoder_layers, cfg.num_decoder_layers, cfg.vocab_size) == (2, 3, 64)
  assert ("output_embedding" in params) == (not tied)


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_text_model_matches_reference(variant):
  g = _golden(variant)
  cfg, params = _load(variant)
  encoded = t5.encode(params, cfg, g["input_tokens"])
  np.testing.assert_allclose(encoded, g["encoded"], atol=TOL, rtol=0)
  out = t5.logits(params, cfg, g["input_tokens"], g["target_tokens"])
  np.testing.assert_allclose(out, g["logits"], atol=TOL, rtol=0)
  scores = t5.score(params, cfg, g["input_tokens"], g["target_tokens"])
  np.testing.assert_allclose(scores, g["scores"], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_voken_rows_match_reference(variant):
  g = _golden(variant)
  vocab = VokenVocabulary.from_dict(json.loads(str(g["voken_vocab"])))
  cfg, params = _load(variant)
  cfg, params = voken_rows.append_rows(
    params, cfg, g["voken_input_rows"], g.get("voken_output_rows")
  )
  assert cfg.vocab_size == vocab.total_vocab_size
  assert cfg.first_voken_id == vocab.first_voken_id
  out = t5.logits(params, cfg, g["input_tokens"], g["voken_target_tokens"])
  np.testing.assert_allclose(out, g["voken_logits"], atol=TOL, rtol=0)
  scores = t5.score(params, cfg, g["input_tokens"], g["voken_target_tokens"])
  np.testing.assert_allclose(scores, g["voken_scores"], atol=TOL, rtol=0)


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_scan_remat_bf16_layouts_import(variant):
  """The importer fills the scanned layout; outputs equal the reference in float32."""
  g = _golden(variant)
  cfg, params = _load(variant, scan_layers=True, remat=True)
  assert params["encoder"]["layers"]["attention"]["query"].shape == (2, 32, 4, 8)
  out = jax.jit(t5.logits, static_argnums=1)(params, cfg, g["input_tokens"], g["target_tokens"])
  np.testing.assert_allclose(out, g["logits"], atol=TOL, rtol=0)


def test_relative_position_buckets_match_reference():
  g = np.load(os.path.join(FIXTURES, "t5_buckets.npz"))
  rel = g["relative_position"]
  n = len(rel)
  for key in g.files:
    if not key.startswith("buckets_"):
      continue
    nb, md, bidi = (int(x) for x in key.split("_")[1:])
    # Row 0 of a [1, n] grid whose key positions are rel + 1000 relative to query 1000.
    full = relative_position_buckets(
      1001, n, bidirectional=bool(bidi), num_buckets=nb, max_distance=md
    )[1000]
    np.testing.assert_array_equal(full, g[key], err_msg=key)


def test_relative_position_buckets_by_hand():
  # 8 bidirectional buckets: 4 per direction, exact below 2, then log-spaced up to 8.
  b = relative_position_buckets(1, 12, bidirectional=True, num_buckets=8, max_distance=8)[0]
  # offsets 0..11 (keys after the query: upper half, 4 + bucket)
  # distance 0 -> 0, 1 -> 1, 2,3 -> 2 (log2(d/2) * 2/2 floored), 4..7 -> 3, >= 8 -> 3
  np.testing.assert_array_equal(b, [0, 5, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7])
  causal = relative_position_buckets(4, 4, bidirectional=False, num_buckets=8, max_distance=8)
  # query 3 sees keys 0..3 at distances 3, 2, 1, 0; future keys share bucket 0.
  np.testing.assert_array_equal(causal[3], [3, 2, 1, 0])
  np.testing.assert_array_equal(causal[0], [0, 0, 0, 0])
