"""Flickr30K (Karpathy split: 29K train / 1K val / 1K test images, 5 captions each), t5-base.

`get_config("t5-large")` swaps the generator size. Data and weight paths: see configs/paper.py.
"""

from configs import paper


def get_config(arg=None):
  c = paper.get_paper_config("flickr30k", arg or "t5-base")
  # ~145K caption + 5K pseudo-query pairs / 2048 per batch = 73 steps an epoch; the
  # reference trains the tokenizer for 5000 epochs.
  c.tokenizer.steps = 366_000
  c.train.steps = 60_000
  # Learning to rank: 5 epochs of the ~150K training queries at batch 128 (the reference).
  c.rank.steps = 5_900
  # `avg-jax compile` builds the LTR trie for this many images (Karpathy training images).
  c.aot.index_size = 29_000
  return c
