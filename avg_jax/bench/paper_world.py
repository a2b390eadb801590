"""A fake "paper world": everything a user brings to configs/flickr30k.py or coco.py, generated.

    world = make_world(root, WORLD_SIZES["paper"], clip_shape, t5_shape, style="flickr30k")
    world["karpathy_json"], world["image_root"], world["clip"], world["t5"], world["pseudo_queries"]

- a Karpathy-split JSON (`write_karpathy`) over generated photos: avg_shapes scenes
  (avg_jax/data/shapes.py) rendered small and resized to a photo's size, saved as JPEG, 5
  captions each; Flickr30K's layout (`<imgid>.jpg` in one folder) or COCO's (`filepath`
  train2014 / val2014, `cocoid`, part of the training images as `restval`);
- a JSON-lines pseudo-query file for the indexed (val and test) images;
- Hugging Face CLIP and T5 directories at the given shapes with random weights and tokenizer
  files of the real formats and sizes (avg_jax/bench/fake_models.py).

A world is written once per parameter set: `world.json` records them, and a later call with
the same ones reuses the folder (a ViT-L/14-336 checkpoint is 1.7 GB).
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from PIL import Image

from avg_jax.artifacts import io
from avg_jax.bench import fake_models, fake_tokenizers
from avg_jax.data import shapes

STYLES = ("flickr30k", "coco")
CAPTIONS_PER_IMAGE = 5
PSEUDO_QUERIES_PER_IMAGE = 5
INDEXED_SPLITS = ("val", "test")
MANIFEST = "world.json"


@dataclasses.dataclass(frozen=True)
class WorldSize:
  """Data and vocabulary sizes of a world (model shapes are passed separately)."""

  images: tuple[int, int, int]  # train, val, test
  photo_size: tuple[int, int]  # width, height of the stored JPEGs
  render_size: int = 64  # scenes are drawn at this size, then resized
  clip_vocab: int = fake_tokenizers.CLIP_VOCAB
  t5_pieces: int = fake_tokenizers.T5_PIECES


WORLD_SIZES = {
  # A few hundred Flickr-sized photos: every stage runs, on real model shapes.
  "paper": WorldSize(images=(200, 50, 50), photo_size=(500, 375)),
  # The test suite's: T5's real tokenizer layout, a tiny CLIP vocabulary and tiny photos.
  "tiny": WorldSize(images=(48, 12, 12), photo_size=(48, 36), render_size=32, clip_vocab=1000),
}

# Model shapes of the tiny world, in our config's field names.
TINY_CLIP = dict(
  image_size=32,
  patch_size=8,
  vision_width=32,
  vision_layers=1,
  vision_heads=2,
  vision_mlp_dim=64,
  text_width=32,
  text_layers=1,
  text_heads=2,
  text_mlp_dim=64,
  projection_dim=32,
  max_text_length=77,
)
TINY_T5 = dict(
  d_model=32, d_kv=16, d_ff=64, num_heads=2, num_encoder_layers=1, num_decoder_layers=1
)


def _file_entry(style: str, imgid: int, split: str, index: int, num_train: int) -> dict:
  """The image's filename (and COCO's filepath / cocoid / restval split)."""
  if style == "flickr30k":
    return {"filename": f"{1_000_000_000 + imgid}.jpg", "split": split}
  # COCO: the last quarter of the training images are Karpathy's "restval" (from val2014).
  restval = split == "train" and index >= num_train - num_train // 4
  folder = "train2014" if split == "train" and not restval else "val2014"
  cocoid = 100_000 + imgid
  return {
    "filepath": folder,
    "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
    "cocoid": cocoid,
    "split": "restval" if restval else split,
  }


def _scenes(size: WorldSize, seed: int) -> Iterator[tuple[str, dict]]:
  for split, count in zip(("train", "val", "test"), size.images):
    for example in shapes.generate(split, count, size.render_size, seed, CAPTIONS_PER_IMAGE):
      yield split, example


def _save_photo(pixels: np.ndarray, path: str, photo_size: tuple[int, int]) -> None:
  Image.fromarray(pixels).resize(photo_size, Image.Resampling.BILINEAR).save(path, quality=90)


def write_karpathy(
  json_path: str,
  image_root: str,
  pseudo_path: str,
  size: WorldSize,
  *,
  style: str = "flickr30k",
  seed: int = 0,
  threads: int = 4,
) -> list[str]:
  """Writes the split JSON, the photos and the pseudo queries; -> every caption (the text the
  tokenizers are made from)."""
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  images, texts, sentid = [], [], 0
  with (
    open(pseudo_path, "w", encoding="utf-8") as pseudo,
    concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool,
  ):
    pending = []
    for imgid, (split, ex) in enumerate(_scenes(size, seed)):
      entry = {**_file_entry(style, imgid, split, ex["index"], size.images[0]), "imgid": imgid}
      folder = os.path.join(image_root, entry.get("filepath", ""))
      os.makedirs(folder, exist_ok=True)
      pending.append(
        pool.submit(
          _save_photo, ex["image"], os.path.join(folder, entry["filename"]), size.photo_size
        )
      )
      sentences = []
      for caption in ex["captions"]:
        sentences.append(
          {"raw": caption, "tokens": caption.lower().split(), "imgid": imgid, "sentid": sentid}
        )
        sentid += 1
      entry.update(sentids=[s["sentid"] for s in sentences], sentences=sentences)
      images.append(entry)
      texts.extend(ex["captions"])
      if split in INDEXED_SPLITS:
        rng = shapes.pseudo_query_rng(seed, split, ex["index"])
        for query in shapes.pseudo_queries(ex["attributes"], rng, PSEUDO_QUERIES_PER_IMAGE):
          pseudo.write(json.dumps({"image_id": imgid, "query": query}) + "\n")
      if len(pending) >= 256:
        for future in pending:
          future.result()
        pending = []
    for future in pending:
      future.result()
  io.write_json(json_path, {"dataset": style, "images": images}, indent=None)
  return texts


def _same_manifest(root: str, manifest: dict) -> bool:
  try:
    with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
      return json.load(f) == manifest
  except (OSError, json.JSONDecodeError):
    return False


def world_paths(root: str, style: str) -> dict[str, str]:
  """Where `make_world` puts each input (the keys name the config values they go to)."""
  return {
    "karpathy_json": os.path.join(root, f"dataset_{style}.json"),
    "image_root": os.path.join(root, "images"),
    "pseudo_queries": os.path.join(root, "pseudo_queries.jsonl"),
    "clip": os.path.join(root, "clip"),
    "t5": os.path.join(root, "t5"),
  }


def make_world(
  root: str,
  size: WorldSize,
  clip_shape: Mapping[str, Any],
  t5_shape: Mapping[str, Any],
  *,
  t5_vocab: int = 32_128,
  style: str = "flickr30k",
  seed: int = 0,
) -> dict[str, str]:
  """Writes (or reuses) the world under `root`; -> `world_paths(root, style)`."""
  manifest = {
    "size": dataclasses.asdict(size),
    "clip": dict(clip_shape),
    "t5": dict(t5_shape),
    "t5_vocab": int(t5_vocab),
    "style": style,
    "seed": seed,
  }
  manifest = json.loads(json.dumps(manifest))  # tuples -> lists, as read back
  out = world_paths(root, style)
  if _same_manifest(root, manifest):
    return out
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(root)
  texts = write_karpathy(
    out["karpathy_json"], out["image_root"], out["pseudo_queries"], size, style=style, seed=seed
  )
  fake_models.write_clip(out["clip"], clip_shape, texts, vocab_size=size.clip_vocab, seed=seed)
  fake_models.write_t5(
    out["t5"], t5_shape, texts, vocab_size=t5_vocab, num_pieces=size.t5_pieces, seed=seed
  )
  io.write_json(os.path.join(root, MANIFEST), manifest, indent=1)
  return out
