"""The `emoji` dataset: Google's Noto emoji pictures with their Unicode / CLDR names.

    avg-jax run --config configs/emoji.py --workdir runs/emoji

Fetches three pinned npm packages with `npm pack` (versions and SHA-256 in
avg_jax/data/emoji.py; into `data.download_dir`, once per machine): 3 786 pictures of 64 x 64
in 1 911 split units (an emoji with its skin tones), 70 / 15 / 15 % train / val / test. Each
picture's caption (its evaluation query when indexed) is its CLDR name ("honeybee", "waving
hand: medium skin tone"); its other texts that name it alone (CLDR keywords, Unicode name,
short names) are its pseudo queries. The models and the method's settings are those of
`karpathy_local.py`, which any other image-caption data gets too: nothing here is tuned to
emoji. `arg`: "tiny" for the test-suite model sizes.
"""

from configs import karpathy_local


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"expected '' or 'tiny', got {arg!r}")
  c = karpathy_local.get_config("captions=1" + (",tiny" if arg == "tiny" else ""))
  c.data.name = "emoji"
  c.data.captions_per_image = 1
  return c
