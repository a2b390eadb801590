"""DecodeConfig, the one form of the decode settings: exact manifest round trip, unknown and
missing keys, old manifests' defaults, validation in one place."""

import dataclasses
import json

import ml_collections
import pytest

from avg_jax.decoding.config import ADDED_KEYS, DecodeConfig
from avg_jax.errors import UserError

SETTINGS = [
  DecodeConfig(),
  DecodeConfig(beam_size=3, top_k=7, mask_mode="renormalize", batch_size=8),
  DecodeConfig(tie_break="similarity", voken_logits_only=True, dense_levels=0, trained_length=2),
  DecodeConfig(tie_break="image_id", hybrid_weight=4.5, hybrid_query="generator", trained_length=5),
  DecodeConfig(hybrid_weight=0.0, trained_length=3),
]

# The `decode` of an export manifest of format 1 (runs/emoji/export/manifest.json).
CURRENT_MANIFEST = {
  "batch_size": 32,
  "beam_size": 10,
  "dense_levels": 1,
  "hybrid_query": "dual_encoder",
  "hybrid_weight": None,
  "mask_mode": "after_softmax",
  "tie_break": "image_id",
  "top_k": 10,
  "trained_length": 5,
  "voken_logits_only": False,
}


@pytest.mark.parametrize("d", SETTINGS)
def test_round_trip_is_exact(d):
  assert DecodeConfig.from_dict(d.to_dict()) == d
  # Through the manifest's JSON too.
  assert DecodeConfig.from_dict(json.loads(json.dumps(d.to_dict()))) == d
  assert hash(DecodeConfig.from_dict(d.to_dict())) == hash(d)  # a usable static argument


def test_current_manifest_loads_every_key():
  d = DecodeConfig.from_dict(CURRENT_MANIFEST)
  assert d.trained_length == 5 and d.tie_break == "image_id"
  assert d.to_dict() == CURRENT_MANIFEST


def test_old_manifest_gets_the_documented_defaults():
  old = {k: v for k, v in CURRENT_MANIFEST.items() if k not in ADDED_KEYS}
  assert set(old) == {"batch_size", "beam_size", "mask_mode", "top_k"}
  d = DecodeConfig.from_dict(old)
  assert d == DecodeConfig(beam_size=10, top_k=10, batch_size=32)
  assert (d.tie_break, d.voken_logits_only, d.trained_length, d.hybrid_weight) == (
    "learned",
    False,
    None,  # the vocabulary's P (search.trained_length_of)
    None,
  )


def test_unknown_key_is_one_line_error_naming_it():
  with pytest.raises(UserError, match="unknown key 'beam'") as e:
    DecodeConfig.from_dict(dict(CURRENT_MANIFEST, beam=3))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["beam_size", "top_k", "mask_mode", "batch_size"])
def test_missing_required_key_is_one_line_error_naming_it(key):
  d = {k: v for k, v in CURRENT_MANIFEST.items() if k != key}
  with pytest.raises(UserError, match=f"missing key '{key}'") as e:
    DecodeConfig.from_dict(d)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize(
  "change,message",
  [
    (dict(beam_size=0), "beam_size"),
    (dict(top_k=0), "top_k"),
    (dict(mask_mode="before"), "mask_mode"),
    (dict(tie_break="x"), "tie_break"),
    (dict(hybrid_query="x"), "hybrid_query"),
    (dict(trained_length=0), "trained_length"),
  ],
)
def test_validated_on_construction(change, message):
  with pytest.raises(UserError, match=message):
    DecodeConfig(**change)
  with pytest.raises(UserError, match=message):  # replace builds a new, checked object
    dataclasses.replace(DecodeConfig(), **change)
  with pytest.raises(UserError, match=message):
    DecodeConfig.from_dict(dict(CURRENT_MANIFEST, **change))


def test_from_config_and_derived_settings():
  section = ml_collections.ConfigDict(
    dict(
      beam_size=4,
      top_k=2,
      mask_mode="after_softmax",
      tie_break="similarity",
      voken_logits_only=False,
      dense_levels=1,
      batch_size=16,
      hybrid_weight=None,
      hybrid_query="dual_encoder",
    )
  )
  d = DecodeConfig.from_config(section, recall_ks=(1, 5))
  assert (d.top_k, d.beam, d.trained_length, d.order_by_similarity) == (5, 5, None, True)
  assert d.with_k(1).top_k == 1 and d.with_k(1).beam == 4
  assert d.for_generator(2).trained_length == 2


def test_program_keeps_only_what_the_search_reads():
  # The jitted search's static argument: settings it never reads are reset, so equal programs
  # share one compile (tests/decoding/test_decoding_search.py counts the compiles).
  base = DecodeConfig(beam_size=3, top_k=4, tie_break="image_id", trained_length=3)
  unread = dataclasses.replace(
    base, batch_size=7, hybrid_query="generator", dense_levels=0, tie_break="learned"
  )
  assert unread.program == base.program == dataclasses.replace(base, tie_break="image_id")
  for change in (
    {"beam_size": 5},
    {"top_k": 2},
    {"mask_mode": "renormalize"},
    {"tie_break": "similarity"},
    {"voken_logits_only": True},
    {"hybrid_weight": 1.5},
    {"trained_length": 4},
  ):
    assert dataclasses.replace(base, **change).program != base.program, change
