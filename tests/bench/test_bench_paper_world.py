"""The fake paper world: tokenizers of the real layouts, HF directories the importers accept,
Karpathy files the builder reads (avg_jax/bench/paper_world.py and its helpers)."""

import json
import os

import numpy as np
import pytest

from avg_jax.bench import fake_models, fake_tokenizers, paper_world
from avg_jax.data import karpathy
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.data.text_tokenizer import TextTokenizer
from avg_jax.encoders import bpe, hf_import
from avg_jax.models import t5_hf

TEXTS = [
  "a small red circle in the top left",
  "two large blue squares on the right",
  "a green triangle above a yellow diamond",
  "three shapes: purple, orange and white",
] * 5


def test_t5_sentencepiece_has_t5s_layout_and_hf_ids():
  tok = TextTokenizer(fake_tokenizers.t5_sentencepiece(TEXTS))
  sp = tok._sp
  assert tok.vocab_size == 32_000
  assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  # Hugging Face's T5 tokenizer: the pieces' ids, then EOS (1), then padding (0); its 100
  # <extra_id_*> tokens sit after the pieces (32 000-32 099), below the model's 32 128 rows.
  ids = tok.encode("a red circle")
  assert tok.encode_batch(["a red circle"], len(ids) + 3)[0].tolist() == ids + [1, 0, 0]
  # Captions are covered by learned pieces: the synthetic ones (scored lowest) never win.
  learned = max(max(tok.encode(t)) for t in TEXTS)
  assert learned < 200 and sp.id_to_piece(31_999).startswith("\u2581")
  assert tok.decode(ids) == "a red circle"


def test_clip_bpe_files_have_clips_layout():
  vocab, merges = fake_tokenizers.clip_bpe(TEXTS)
  assert len(vocab) == 49_408 and len(merges) == 49_408 - 512 - 2
  assert (vocab[bpe.START], vocab[bpe.END]) == (49_406, 49_407)
  assert sorted(vocab.values()) == list(range(49_408))
  small = fake_tokenizers.clip_bpe(TEXTS, vocab_size=600)[0]
  assert len(small) == 600 and small[bpe.END] == 599
  with pytest.raises(ValueError, match="below the 514 fixed tokens"):
    fake_tokenizers.clip_bpe(TEXTS, vocab_size=100)


def test_clip_vit_l14_336_config_maps_to_the_paper_shapes(repo_root):
  import configs.paper as paper  # repo_root puts the checkout on sys.path

  hf = fake_models.hf_clip_config(paper.CLIP_VIT_L14_336, 49_408)
  cfg = hf_import.config_from_hf(hf)
  assert (
    cfg.image_size,
    cfg.patch_size,
    cfg.vision_width,
    cfg.vision_layers,
    cfg.vision_heads,
    cfg.vision_mlp_dim,
    cfg.text_width,
    cfg.text_layers,
    cfg.projection_dim,
    cfg.vocab_size,
  ) == (336, 14, 1024, 24, 16, 4096, 768, 12, 768, 49_408)
  # OpenAI's file keeps eos_token_id 2: features pool at the largest id (<|endoftext|>).
  assert cfg.text_pooling == "argmax"


def test_tiny_directories_load_through_the_importers(tmp_path):
  hf = fake_models.write_clip(str(tmp_path / "clip"), paper_world.TINY_CLIP, TEXTS, vocab_size=700)
  cfg, params = hf_import.load_hf_clip(str(tmp_path / "clip"))
  assert cfg.vocab_size == 700 and hf["vision_config"]["image_size"] == 32
  assert np.all(np.isfinite(params["vision"]["patch_embedding"]))
  tokenizer = bpe.ClipBpeTokenizer.load(str(tmp_path / "clip"))
  assert tokenizer.encode_batch(["a red circle"], 8)[0, 0] == 698
  fake_models.write_t5(str(tmp_path / "t5"), paper_world.TINY_T5, TEXTS)
  t5_cfg, t5_params = t5_hf.load_hf_t5(str(tmp_path / "t5"))
  assert (t5_cfg.vocab_size, t5_cfg.d_model, t5_cfg.feed_forward) == (32_128, 32, "relu")
  assert t5_params["token_embedding"].shape == (32_128, 32)
  assert TextTokenizer.load(str(tmp_path / "t5" / "spiece.model")).vocab_size == 32_000


@pytest.mark.parametrize("style", ["flickr30k", "coco"])
def test_karpathy_world_reads_back(tmp_path, style):
  size = paper_world.WorldSize(images=(8, 2, 3), photo_size=(40, 30), render_size=16)
  paths = paper_world.world_paths(str(tmp_path), style)
  texts = paper_world.write_karpathy(
    paths["karpathy_json"], paths["image_root"], paths["pseudo_queries"], size, style=style
  )
  assert len(texts) == 13 * 5
  entries = karpathy.read_entries(paths["karpathy_json"], paths["image_root"])
  assert {s: len(e) for s, e in entries.items()} == {"train": 8, "val": 2, "test": 3}
  assert all(os.path.isfile(e.path) for split in entries.values() for e in split)
  raw = json.load(open(paths["karpathy_json"]))["images"]
  if style == "coco":
    assert {r["split"] for r in raw} == {"train", "restval", "val", "test"}
    assert all(r["filename"].startswith(f"COCO_{r['filepath']}_") for r in raw)
  indexed = {e.image_id for split in ("val", "test") for e in entries[split]}
  pairs = pseudo_lib.read_user_file(paths["pseudo_queries"], {r["imgid"] for r in raw})
  assert len(pairs) == 5 * 5 and {i for i, _ in pairs} == indexed
