"""Regenerates the CLIP golden fixtures with PyTorch `transformers` (not run by CI).

    .venv/bin/python tests/make_clip_fixtures.py

For each tiny config NAME it writes
  tests/fixtures/clip_NAME/      a complete Hugging Face CLIP directory: config.json,
                                 model.safetensors (randomly initialised, then perturbed so that
                                 LayerNorm scales/biases are not trivial), preprocessor_config.json,
                                 vocab.json, merges.txt, tokenizer_config.json
  tests/fixtures/clip_NAME.npz   raw images (different sizes), CLIPImageProcessor pixel values,
                                 texts, CLIPTokenizer ids, get_image_features, get_text_features;
                                 edge_input_ids / edge_text_features: hand-made id rows no
                                 tokenizer writes (no end token, the config's pad id inside a
                                 row), to pin down which position HF pools.
The BPE vocabulary is tiny: the 256 byte symbols (plain and `</w>`-final), merges learned here
from a few captions, and the start/end tokens.
"""

import collections
import json
import pathlib
import re
import shutil

import numpy as np
import torch
import transformers
from transformers.models.clip.tokenization_clip import bytes_to_unicode

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

CORPUS = """a red circle to the left of a blue square. two green triangles above a yellow star.
a small purple square below a large orange circle. the dog's ball is red. three blue stars.
a man rides a bicycle down the street. a woman holding an umbrella in the rain.
children playing football in a park near the river. a cat sleeping on the sofa."""

TEXTS = [
  "A red circle to the left of a blue square.",
  "  Two   GREEN triangles,\tabove a yellow star!!  ",
  "the dog's ball isn't red; it's 42% blue",
  "Café crème & naïve déjà-vu",
  "日本語 text with CJK",
  "hello<|endoftext|>world",
  "",
  "a very long caption that keeps going on and on with many many words so that it must be "
  "truncated by the tokenizer at the maximum length",
]

CONFIGS = {
  # Legacy eos_token_id == 2 (argmax pooling), quick_gelu, patch 8.
  "tiny_a": dict(
    vision=dict(
      image_size=32,
      patch_size=8,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=64,
      hidden_act="quick_gelu",
    ),
    text=dict(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=48,
      max_position_embeddings=16,
      hidden_act="quick_gelu",
      eos_token_id=2,
    ),
    projection_dim=16,
    image_sizes=[(45, 60), (70, 38), (32, 32)],
    seed=0,
  ),
  # First-EOS pooling, exact gelu, patch 6, odd widths.
  "tiny_b": dict(
    vision=dict(
      image_size=30,
      patch_size=6,
      hidden_size=24,
      num_hidden_layers=3,
      num_attention_heads=3,
      intermediate_size=40,
      hidden_act="gelu",
    ),
    text=dict(
      hidden_size=40,
      num_hidden_layers=1,
      num_attention_heads=5,
      intermediate_size=72,
      max_position_embeddings=20,
      hidden_act="gelu",
    ),
    projection_dim=12,
    image_sizes=[(31, 90), (64, 48), (17, 25)],
    seed=1,
  ),
}


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
  """Plain BPE over byte symbols of lower-case words (enough for a test vocabulary)."""
  byte_table = bytes_to_unicode()
  words = collections.Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()))
  seqs = {w: [byte_table[b] for b in w.encode()] for w in words}
  for w in seqs:
    seqs[w][-1] += "</w>"
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, seq in seqs.items():
      for a, b in zip(seq[:-1], seq[1:]):
        pairs[(a, b)] += words[w]
    if not pairs:
      break
    best = max(pairs, key=lambda p: (pairs[p], p))
    merges.append(best)
    for w, seq in seqs.items():
      out, i = [], 0
      while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
          out.append(seq[i] + seq[i + 1])
          i += 2
        else:
          out.append(seq[i])
          i += 1
      seqs[w] = out
  return merges


def write_tokenizer(directory: pathlib.Path) -> int:
  merges = learn_merges(CORPUS, 120)
  symbols = list(bytes_to_unicode().values())
  vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
  vocab_list += ["<|startoftext|>", "<|endoftext|>"]
  vocab = {}
  for token in vocab_list:
    vocab.setdefault(token, len(vocab))
  (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (directory / "merges.txt").write_text(
    "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8"
  )
  return len(vocab)


def random_images(sizes, rng):
  images = []
  for h, w in sizes:
    # Smooth gradients plus noise: bicubic resampling then has real work to do.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
      [xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / max(h + w - 2, 1)], -1
    )
    noise = rng.integers(-40, 41, size=(h, w, 3))
    images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
  return images


def edge_ids(tokenizer, max_length: int, pad_id: int) -> np.ndarray:
  """Id rows that test the pooled position: without an end token (HF pools position 0 for
  first-EOS configs) and with the config's pad id (1) inside a row (an ordinary token to HF)."""
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  words = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
  assert len(words) >= 4 and pad_id not in words and eos not in words, words
  fill = [eos] * max_length  # CLIPTokenizer pads with its end token
  rows = [
    [bos] + (words * max_length)[: max_length - 1],  # no end token, full row
    [bos] + words[:3] + [pad_id] * max_length,  # no end token, pad-id tail
    [bos] + words[:2] + [pad_id] + words[2:4] + fill,  # pad id mid-row, then EOS
    [bos] + words[:2] + [pad_id, pad_id] + fill,  # pad ids just before EOS
  ]
  return np.array([r[:max_length] for r in rows], np.int64)


def make(name: str, spec: dict) -> None:
  directory = FIXTURES / f"clip_{name}"
  if directory.exists():
    shutil.rmtree(directory)
  directory.mkdir(parents=True)
  vocab_size = write_tokenizer(directory)
  tokenizer = transformers.CLIPTokenizer(
    str(directory / "vocab.json"), str(directory / "merges.txt")
  )
  tokenizer.save_pretrained(str(directory))
  text_cfg = dict(spec["text"], vocab_size=vocab_size, layer_norm_eps=1e-5)
  if "eos_token_id" not in text_cfg:
    text_cfg.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
  config = transformers.CLIPConfig(
    text_config=text_cfg,
    vision_config=dict(spec["vision"], layer_norm_eps=1e-5),
    projection_dim=spec["projection_dim"],
  )
  torch.manual_seed(spec["seed"])
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(str(directory), safe_serialization=True)

  size = spec["vision"]["image_size"]
  processor = transformers.CLIPImageProcessor(
    size={"shortest_edge": size}, crop_size={"height": size, "width": size}
  )
  processor.save_pretrained(str(directory))
  rng = np.random.default_rng(spec["seed"])
  images = random_images(spec["image_sizes"], rng)
  pixel_values = processor(images=images, return_tensors="np")["pixel_values"]  # [B, 3, S, S]
  max_length = spec["text"]["max_position_embeddings"]
  tokens = tokenizer(
    TEXTS, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
  )
  with torch.no_grad():
    image_features = model.get_image_features(pixel_values=torch.from_numpy(pixel_values))
    text_features = model.get_text_features(
      input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
    )
    # No attention mask: our text tower has none either (a causal mask only).
    edge = edge_ids(tokenizer, max_length, config.text_config.pad_token_id)
    edge_features = model.get_text_features(input_ids=torch.from_numpy(edge))
  arrays = {f"image_{i}": im for i, im in enumerate(images)}
  np.savez(
    FIXTURES / f"clip_{name}.npz",
    num_images=np.int64(len(images)),
    pixel_values=pixel_values.transpose(0, 2, 3, 1).astype(np.float32),  # NHWC
    texts=np.array(TEXTS),
    input_ids=tokens["input_ids"].numpy().astype(np.int32),
    image_features=image_features.numpy().astype(np.float32),
    text_features=text_features.numpy().astype(np.float32),
    edge_input_ids=edge.astype(np.int32),
    edge_text_features=edge_features.numpy().astype(np.float32),
    **arrays,
  )
  total = sum(f.stat().st_size for f in directory.iterdir())
  print(
    f"clip_{name}: vocab {vocab_size}, dir {total / 1024:.0f} KiB, "
    f"ids[0] {tokens['input_ids'][0].tolist()}"
  )


def main():
  FIXTURES.mkdir(exist_ok=True)
  for name, spec in CONFIGS.items():
    make(name, spec)


if __name__ == "__main__":
  main()
