"""Regenerates the constrained-decoding golden fixtures with PyTorch `transformers` (not CI).

    .venv/bin/python tests/make_decode_fixtures.py

The reference retrieves with Hugging Face `generate(num_beams=B, num_return_sequences=B,
prefix_allowed_tokens_fn=trie, length_penalty=1)` and a Python dict trie over the indexed
identifiers' token ids. For each tiny random T5 NAME this writes

  tests/fixtures/decode_NAME/       config.json + model.safetensors (Hugging Face T5)
  tests/fixtures/decode_NAME.npz    the voken layout, the queries, the tries and, per
                                    (trie, beam size), HF's returned identifiers and
                                    `sequences_scores`.

Early stopping: every hypothesis has exactly P + 1 generated tokens (P vokens, then EOS, the
only token the trie allows at depth P) and `max_new_tokens = P + 1`, so generation ends at the
EOS step whatever `early_stopping` says; the script checks that True and False agree, and that
the cached and uncached paths agree. HF divides the summed log-probs by the generated length
(P + 1 with length_penalty 1); the script checks that `sequences_scores * (P + 1)` equals a
teacher-forced sum of full-vocabulary log-softmax for every returned sequence.

When a trie has fewer leaves than beams, HF fills the missing beams from the other initial
beams, whose score starts at -1e9 (not -inf): those "leaked" hypotheses come back with scores
near -1e9 / (P + 1). The test compares only the real ones (score > -1e6) and expects our
search to return exactly those, then invalid slots.
"""

import pathlib
import shutil

import numpy as np
import torch
import transformers

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
EOS, START = 1, 0
BEAMS = (1, 5, 10)

CONFIGS = {
  # T5 v1.0: ReLU, tied embeddings; one codebook shared by L = 3 levels.
  "v10": dict(
    text_vocab=24,
    codebook=12,
    levels=3,
    shared=True,
    disambiguation=0,
    d_model=32,
    d_kv=8,
    d_ff=64,
    heads=4,
    enc_layers=2,
    dec_layers=2,
    feed_forward="relu",
    tie=True,
    seed=0,
  ),
  # T5 v1.1: gated GELU, untied; per-level codebooks and a disambiguation position.
  # (Equal encoder/decoder depths: HF 4.57's cached generate fails when they differ.)
  "v11": dict(
    text_vocab=20,
    codebook=10,
    levels=2,
    shared=False,
    disambiguation=4,
    d_model=24,
    d_kv=6,
    d_ff=48,
    heads=4,
    enc_layers=2,
    dec_layers=2,
    feed_forward="gated-gelu",
    tie=False,
    seed=1,
  ),
}


def position_layout(c):
  """(position sizes, token id of code 0 per position) as in avg_jax/vokens.py."""
  sizes = [c["codebook"]] * c["levels"] + ([c["disambiguation"]] if c["disambiguation"] else [])
  offsets = []
  for level in range(c["levels"]):
    offsets.append(c["text_vocab"] + (0 if c["shared"] else level * c["codebook"]))
  level_tokens = c["codebook"] * (1 if c["shared"] else c["levels"])
  if c["disambiguation"]:
    offsets.append(c["text_vocab"] + level_tokens)
  total = c["text_vocab"] + level_tokens + c["disambiguation"]
  return np.asarray(sizes), np.asarray(offsets), total


def make_tries(rng, sizes):
  """A larger trie with shared prefixes and one-child nodes; a tiny one (3 leaves)."""
  p = len(sizes)
  rows = set()
  # every first code present (>= 10 root children: beam 10 never runs short at step 1) ...
  for first in range(sizes[0]):
    rows.add((first,) + tuple(int(rng.integers(0, s)) for s in sizes[1:]))
  # ... shared prefixes: several sequences below a few popular prefixes ...
  for _ in range(25):
    head = (int(rng.integers(0, 3)),)
    rows.add(head + tuple(int(rng.integers(0, s)) for s in sizes[1:]))
  rows = sorted(rows)
  big = np.asarray(rows, np.int64)
  # ... and nodes with exactly one child must exist (checked, not assumed).
  one_child = any(
    len({r[d] for r in rows if r[:d] == pre}) == 1
    for d in range(1, p)
    for pre in {r[:d] for r in rows}
  )
  shared = any(
    len({r[d] for r in rows if r[:d] == pre}) >= 3
    for d in range(1, p)
    for pre in {r[:d] for r in rows}
  )
  assert one_child and shared, "trie lacks a one-child node or a shared prefix"
  small = big[rng.permutation(len(big))[:3]]
  return {"big": big, "small": small}


class DictTrie:
  """The reference's kind of trie: nested dicts over token ids, from the start token."""

  def __init__(self, token_rows):
    self.root = {}
    for row in token_rows:
      node = self.root
      for t in [START] + list(row) + [EOS]:
        node = node.setdefault(int(t), {})

  def allowed(self, prefix):
    node = self.root
    for t in prefix:
      node = node.get(int(t))
      if node is None:
        return []
    return list(node.keys())


def build_model(c, total_vocab):
  cfg = transformers.T5Config(
    vocab_size=total_vocab,
    d_model=c["d_model"],
    d_kv=c["d_kv"],
    d_ff=c["d_ff"],
    num_heads=c["heads"],
    num_layers=c["enc_layers"],
    num_decoder_layers=c["dec_layers"],
    feed_forward_proj=c["feed_forward"],
    tie_word_embeddings=c["tie"],
    dropout_rate=0.0,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    pad_token_id=0,
    eos_token_id=EOS,
    decoder_start_token_id=START,
  )
  torch.manual_seed(c["seed"])
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:  # non-trivial norm scales
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  return model


def teacher_forced_sum(model, input_ids, attention_mask, token_rows):
  """Sum of full-vocabulary log-softmax of `token_rows` (vokens + EOS), `[n]`."""
  labels = torch.as_tensor(np.concatenate([token_rows, np.full((len(token_rows), 1), EOS)], 1))
  with torch.no_grad():
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
  lp = torch.log_softmax(out.double(), -1).gather(-1, labels[..., None])[..., 0]
  return lp.sum(-1).numpy()


def generate(model, input_ids, attention_mask, trie, beam, p, use_cache, early_stopping):
  """HF's sequences `[B * beam, 1 + P + 1]` and scores `[B * beam]` (sum / (P + 1))."""
  out = model.generate(
    input_ids=input_ids,
    attention_mask=attention_mask,
    num_beams=beam,
    num_return_sequences=beam,
    max_new_tokens=p + 1,
    length_penalty=1.0,
    early_stopping=early_stopping,
    do_sample=False,
    use_cache=use_cache,
    prefix_allowed_tokens_fn=lambda b, ids: trie.allowed(ids.tolist()),
    output_scores=True,
    return_dict_in_generate=True,
  )
  seqs = out.sequences.numpy()  # start, vokens, EOS
  if beam == 1:
    # num_beams=1 is HF's greedy path, which reports no sequence score: recompute it.
    q = np.arange(input_ids.shape[0])
    sums = teacher_forced_sum(model, input_ids[q], attention_mask[q], seqs[:, 1:-1])
    return seqs, (sums / (p + 1)).astype(np.float32)
  return seqs, out.sequences_scores.numpy()


def main():
  for name, c in CONFIGS.items():
    rng = np.random.default_rng(c["seed"])
    sizes, offsets, total = position_layout(c)
    p = len(sizes)
    model = build_model(c, total)
    folder = FIXTURES / f"decode_{name}"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    for extra in ("generation_config.json",):
      (folder / extra).unlink(missing_ok=True)

    batch, length = 3, 7
    tokens = rng.integers(3, c["text_vocab"], (batch, length))
    tokens[1, 5:] = 0  # a padded query
    tokens[2, 3:] = 0
    input_ids = torch.as_tensor(tokens)
    attention_mask = (input_ids != 0).long()
    tries = make_tries(rng, sizes)
    arrays = dict(
      input_tokens=tokens.astype(np.int32),
      position_sizes=sizes,
      position_offsets=offsets,
      text_vocab=np.int64(c["text_vocab"]),
      codebook=np.int64(c["codebook"]),
      levels=np.int64(c["levels"]),
      shared=np.bool_(c["shared"]),
      disambiguation=np.int64(c["disambiguation"]),
    )
    for trie_name, codes in tries.items():
      token_rows = codes + offsets[None, :]
      trie = DictTrie(token_rows)
      arrays[f"{trie_name}_codes"] = codes.astype(np.int32)
      for beam in BEAMS:
        seqs, scores = generate(model, input_ids, attention_mask, trie, beam, p, False, True)
        for use_cache, early in ((True, True), (False, False)):
          seqs2, scores2 = generate(
            model, input_ids, attention_mask, trie, beam, p, use_cache, early
          )
          np.testing.assert_array_equal(seqs, seqs2)
          np.testing.assert_allclose(scores, scores2, rtol=1e-5, atol=1e-6)
        assert seqs.shape[1] == p + 2 and (seqs[:, 0] == START).all()
        real = scores > -1e6
        assert (seqs[real, -1] == EOS).all()
        got = seqs[:, 1:-1] - offsets[None, :]
        # HF's score * (P + 1) is the summed full-vocabulary log-prob of vokens + EOS.
        q_of_row = np.repeat(np.arange(batch), beam)
        sums = teacher_forced_sum(
          model, input_ids[q_of_row], attention_mask[q_of_row], seqs[:, 1:-1]
        )
        np.testing.assert_allclose(scores[real] * (p + 1), sums[real], rtol=1e-4, atol=1e-4)
        arrays[f"{trie_name}_beam{beam}_codes"] = got.reshape(batch, beam, p).astype(np.int32)
        arrays[f"{trie_name}_beam{beam}_scores"] = scores.reshape(batch, beam).astype(np.float32)
        print(f"{name} {trie_name} beam {beam}: {int(real.sum())} real of {real.size}")
    np.savez_compressed(FIXTURES / f"decode_{name}.npz", **arrays)
    print("wrote", folder, FIXTURES / f"decode_{name}.npz")


if __name__ == "__main__":
  main()
