"""Regenerates the T5 golden fixtures from PyTorch `transformers` (not run by CI).

    .venv/bin/python tests/make_t5_fixtures.py

Needs the optional `reference` extra (torch + transformers). For each variant, v1_0 (ReLU, tied
embeddings) and v1_1 (gated-GELU, untied), writes to tests/fixtures/:

  t5_<variant>/config.json, model.safetensors   a tiny randomly initialised text-only model
  t5_<variant>_golden.npz                        inputs and the reference outputs:
      input_tokens [B, S] (0-padded), target_tokens [B, T] (0-padded text ids),
      encoded [B, S, D], logits [B, T, V], scores [B]
      voken_input_rows [R, D], voken_output_rows [R, D] (untied only): rows appended for
      `voken_vocab` (JSON of a VokenVocabulary), voken_target_tokens [B, T],
      voken_logits [B, T, V + R], voken_scores [B]
  t5_buckets.npz   the reference bucket of every relative position in [-1000, 1000] for a few
                   (num_buckets, max_distance, bidirectional) settings

Scores are sums of full-vocabulary log-softmax at the non-padding targets.
"""

import json
import os
import shutil

import numpy as np
import torch
from transformers import T5Config as HFConfig
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")

TEXT_VOCAB = 64
VOKEN_VOCAB = dict(
  text_vocab_size=TEXT_VOCAB,
  codebook_size=12,
  num_levels=2,
  shared_codebook=True,
  disambiguation_size=3,
)
NUM_VOKEN_ROWS = 12 + 3

VARIANTS = {
  "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
  "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
BUCKET_SETTINGS = [
  (32, 128, True),
  (32, 128, False),
  (8, 20, True),
  (16, 64, False),
  (64, 256, True),
]


def tiny_config(variant: str) -> HFConfig:
  # 2 encoder / 3 decoder layers so a layer-count mix-up shows; max_distance 20 with inputs
  # of 24 tokens exercises the exact, logarithmic and saturated bucket ranges.
  return HFConfig(
    vocab_size=TEXT_VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
    **VARIANTS[variant],
  )


def adjust_init(model) -> None:
  """Random layer-norm scales (default is all ones, which would hide a missing scale).

  An untied lm_head gets N(0, 1/d_model) (our and t5x's init) instead of Hugging Face's
  N(0, 1): logits of unit scale, as in trained models. With N(0, 1) the logits reach +-40 and
  float32 accumulation-order noise alone (both sides are ~3e-6 from a float64 product of their
  own hidden states) reaches ~1e-5 absolute.
  """
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    if not model.config.tie_word_embeddings:
      model.lm_head.weight.normal_(0.0, model.config.d_model**-0.5)


def inputs(rng: np.random.Generator):
  batch, src, tgt = 3, 24, 5
  input_tokens = rng.integers(3, TEXT_VOCAB, size=(batch, src))
  input_tokens[0, 20:] = 0  # padding
  input_tokens[1, 9:] = 0
  input_tokens[0, 19] = input_tokens[1, 8] = input_tokens[2, -1] = 1  # EOS
  targets = rng.integers(3, TEXT_VOCAB, size=(batch, tgt))
  targets[:, -1] = 1
  targets[2, 2:] = 0
  targets[2, 1] = 1
  return input_tokens, targets


def shift_right(targets: np.ndarray) -> np.ndarray:
  return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)


def run(model, input_tokens, targets):
  ids = torch.tensor(input_tokens)
  with torch.no_grad():
    out = model(
      input_ids=ids,
      attention_mask=(ids != 0).long(),
      decoder_input_ids=torch.tensor(shift_right(targets)),
    )
  logits = out.logits.float()
  lp = torch.log_softmax(logits, dim=-1)
  tgt = torch.tensor(targets)
  token_lp = torch.gather(lp, -1, tgt[..., None])[..., 0]
  scores = torch.where(tgt != 0, token_lp, torch.zeros_like(token_lp)).sum(-1)
  return (out.encoder_last_hidden_state.numpy(), logits.numpy(), scores.numpy())


def make_variant(variant: str, seed: int) -> None:
  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  model = T5ForConditionalGeneration(tiny_config(variant)).eval()
  adjust_init(model)
  model_dir = os.path.join(FIXTURES, f"t5_{variant}")
  shutil.rmtree(model_dir, ignore_errors=True)
  model.save_pretrained(model_dir, safe_serialization=True)
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(model_dir, extra)):
      os.remove(os.path.join(model_dir, extra))

  input_tokens, targets = inputs(rng)
  encoded, logits, scores = run(model, input_tokens, targets)

  # Voken rows appended as AVG does: level rows = codebook, disambiguation rows random; the
  # untied output rows follow avg_jax/models/voken_rows.py's convention (x d_model**-0.5).
  d = model.config.d_model
  codebook = rng.standard_normal((12, d)).astype(np.float32)
  disamb = (rng.standard_normal((3, d)) * 0.7).astype(np.float32)
  in_rows = np.concatenate([codebook, disamb])
  out_rows = np.concatenate([codebook * d**-0.5, disamb * 0.05]).astype(np.float32)
  model.resize_token_embeddings(TEXT_VOCAB + NUM_VOKEN_ROWS)
  with torch.no_grad():
    model.shared.weight[TEXT_VOCAB:] = torch.tensor(in_rows)
    if not model.config.tie_word_embeddings:
      model.lm_head.weight[TEXT_VOCAB:] = torch.tensor(out_rows)
  voken_targets = rng.integers(TEXT_VOCAB, TEXT_VOCAB + NUM_VOKEN_ROWS, size=targets.shape)
  voken_targets[:, -1] = 1
  voken_targets[2, 2:] = 0
  voken_targets[2, 1] = 1
  _, voken_logits, voken_scores = run(model, input_tokens, voken_targets)

  arrays = dict(
    input_tokens=input_tokens.astype(np.int32),
    target_tokens=targets.astype(np.int32),
    encoded=encoded,
    logits=logits,
    scores=scores,
    voken_input_rows=in_rows,
    voken_vocab=np.asarray(json.dumps(VOKEN_VOCAB)),
    voken_target_tokens=voken_targets.astype(np.int32),
    voken_logits=voken_logits,
    voken_scores=voken_scores,
  )
  if not model.config.tie_word_embeddings:
    arrays["voken_output_rows"] = out_rows
  np.savez_compressed(os.path.join(FIXTURES, f"t5_{variant}_golden.npz"), **arrays)
  print(f"t5_{variant}: logits {logits.shape}, voken logits {voken_logits.shape}")


def make_buckets() -> None:
  rel = torch.arange(-1000, 1001)
  arrays = {"relative_position": rel.numpy().astype(np.int32)}
  for nb, md, bidi in BUCKET_SETTINGS:
    b = T5Attention._relative_position_bucket(
      rel, bidirectional=bidi, num_buckets=nb, max_distance=md
    )
    arrays[f"buckets_{nb}_{md}_{int(bidi)}"] = b.numpy().astype(np.int32)
  np.savez_compressed(os.path.join(FIXTURES, "t5_buckets.npz"), **arrays)


def main() -> None:
  os.makedirs(FIXTURES, exist_ok=True)
  make_variant("v1_0", seed=10)
  make_variant("v1_1", seed=11)
  make_buckets()


if __name__ == "__main__":
  main()
