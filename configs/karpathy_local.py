"""Your own images in Karpathy-split format, with the CPU-size models of `smoke.py`.

    avg-jax run --config configs/karpathy_local.py --workdir runs/mine \
      --config.data.karpathy_json=/data/mine/dataset.json \
      --config.data.image_root=/data/mine/images

The JSON follows the Flickr30K / COCO split files (README, "Your own images"): `{"images":
[{"filename", "split": "train" | "val" | "test", "sentences": [{"raw": ...}, ...]}, ...]}`.
Every split needs at least one image and the training split at least 64 (image, caption)
pairs (tokenizer.batch_size). `arg` is a comma-separated list of:
  captions=N  captions kept per image (default 1: any image with a caption can be used; every
              image needs at least N, the first N are kept, each is a query at evaluation)
  tiny        the test-suite model sizes of `smoke.py:tiny` (seconds instead of minutes)
e.g. `configs/karpathy_local.py:captions=5` or `configs/karpathy_local.py:tiny`.
"""

from configs import smoke


def _parse(arg):
  options = {"captions": 1, "tiny": False}
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, sep, value = item.partition("=")
    if key == "tiny" and not sep:
      options["tiny"] = True
    elif key == "captions" and sep and value.isdigit() and int(value) >= 1:
      options["captions"] = int(value)
    else:
      raise ValueError(f"expected 'tiny' and/or 'captions=N' (N >= 1), got {item!r}")
  return options


def get_config(arg=None):
  options = _parse(arg)
  c = smoke.get_config("tiny" if options["tiny"] else None)
  c.data.name = "karpathy"
  c.data.karpathy_json = ""  # give it: --config.data.karpathy_json=...
  c.data.image_root = ""  # and --config.data.image_root=...
  c.data.captions_per_image = options["captions"]
  # Bad images (missing, unreadable, SVG, too few captions) stop `prepare` with each one named;
  # --config.data.skip_bad_images=true leaves them out instead (listed in skipped_images.json).
  c.data.skip_bad_images = False
  # A text vocabulary a few hundred captions can support; SentencePiece needs exactly this
  # many pieces, and a smaller corpus gets an error naming the largest size it supports
  # (then lower --config.text_tokenizer.vocab_size; t5.vocab_size may stay larger).
  c.text_tokenizer.vocab_size = 200 if options["tiny"] else 500
  c.text_tokenizer.model_type = "bpe"
  c.text_tokenizer.max_length = 32
  c.t5.vocab_size = c.text_tokenizer.vocab_size
  # The image tokenizer's batches are (image, caption) pairs of the training split: 64 lets a
  # dataset of 64 training pairs or more fit it; k-means then seeds the codebook from 4
  # batches (at least 4 points per code of smoke's 64; the sampler wraps around small data).
  c.tokenizer.batch_size = 64
  c.tokenizer.kmeans_init_batches = 4
  # Your data's retrieval numbers, not the paper's identifier ablations (rq, hkmeans, atomic:
  # one more generator each; the main job runs them on avg_shapes). Add them back with
  # --config.evaluate.methods='("two_tower","avg","avg_ltr","avg_hybrid","rq","hkmeans","atomic")'.
  c.evaluate.methods = ("two_tower", "avg", "avg_ltr", "avg_hybrid")
  return c
