"""MS-COCO (Karpathy split: 113K train+restval / 5K val / 5K test images), t5-large.

The reference's COCO script uses t5-large; `get_config("t5-base")` for the smaller model.
"""

from configs import paper


def get_config(arg=None):
  c = paper.get_paper_config("coco", arg or "t5-large")
  # ~566K caption + 25K pseudo-query pairs / 2048 per batch = 289 steps an epoch; the
  # reference trains the tokenizer for 5000 epochs.
  c.tokenizer.steps = 1_445_000
  c.train.steps = 200_000
  # Learning to rank: 5 epochs of the ~591K training queries at batch 128 (the reference).
  c.rank.steps = 23_100
  c.evaluate.efficiency_sizes = (5000, 10000, 100000, 1000000)
  # `avg-jax compile` builds the LTR trie for this many images (Karpathy train + restval images).
  c.aot.index_size = 113_287
  return c
