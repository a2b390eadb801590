"""What a tokenizer fit is: its name, and the (image, text) pairs it is fit on.

Which pairs depend on the protocol (`config.protocol`): the training split's (image, caption)
pairs, plus, for the transductive protocol with `tokenizer.fit_on_pseudo_queries`, the (image,
pseudo query) pairs of the indexed (val / test) images (the reference's default; hkmeans then
clusters those images too). Such a fit is named `<scheme>+pseudo`, a fit on training pairs
alone `<scheme>` (`tokenizer_name`), so both protocols share a fit that does not depend on them.
"""

import ml_collections
import numpy as np

from avg_jax.artifacts.voken_tables import PSEUDO_SUFFIX
from avg_jax.data import pseudo_queries as pseudo_lib
from avg_jax.errors import UserError
from avg_jax.tokenizer.model import SCHEMES

# Schemes whose identifiers depend on what they are fit on.
FITTED_SCHEMES = ("avg", "rq", "hkmeans")


def check_scheme(scheme: str) -> str:
  if scheme not in SCHEMES:
    raise UserError(
      f"config key tokenizer.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}"
    )
  return scheme


def fits_on_pseudo_queries(config: ml_collections.ConfigDict, scheme: str, protocol: str) -> bool:
  """Whether `scheme`'s tokenizer under `protocol` is fit on pseudo-query pairs too."""
  return (
    pseudo_lib.check_protocol(protocol) == "transductive"
    and scheme in FITTED_SCHEMES
    and bool(config.tokenizer.fit_on_pseudo_queries)
  )


def tokenizer_name(config: ml_collections.ConfigDict, scheme: str, protocol: str) -> str:
  """The voken table a generator of `scheme` uses under `protocol` (a `tokenizer/` folder)."""
  return scheme + (PSEUDO_SUFFIX if fits_on_pseudo_queries(config, scheme, protocol) else "")


def fit_pairs(embeddings: dict, pseudo: tuple[np.ndarray, np.ndarray] | None) -> dict:
  """The (image, text) pairs a tokenizer is fit on.

  `embeddings`: `{split: read_embeddings(...)}`; `pseudo`: `(image ids int64[Q], query_emb
  [Q, D])` of the pseudo queries, or None. Returns `image_ids [N]`, `image_emb [N, D]`,
  `caption_emb [M, D]`, `caption_image_index [M]` and a `description`: the training split's
  images and captions, plus (with `pseudo`) the images of the other splits that have pseudo
  queries, paired with them.
  """
  train = embeddings["train"]
  fit = dict(
    image_ids=train["image_ids"],
    image_emb=train["image_emb"],
    caption_emb=train["caption_emb"],
    caption_image_index=train["caption_image_index"],
    description="train pairs",
  )
  if pseudo is None:
    return fit
  pseudo_ids, pseudo_emb = pseudo
  indexed = [s for s in embeddings if s != "train"]
  image_ids = np.concatenate([train["image_ids"]] + [embeddings[s]["image_ids"] for s in indexed])
  keep = np.isin(pseudo_ids, image_ids) & ~np.isin(pseudo_ids, train["image_ids"])
  if pseudo_emb.shape[1:] != train["caption_emb"].shape[1:]:
    raise UserError(
      f"pseudo query embeddings are {pseudo_emb.shape[1]}-d, captions "
      f"{train['caption_emb'].shape[1]}-d; rerun `avg-jax embed`"
    )
  row_of = {int(i): r for r, i in enumerate(image_ids)}
  index = np.asarray([row_of[int(i)] for i in pseudo_ids[keep]], np.int64)
  return dict(
    image_ids=image_ids,
    image_emb=np.concatenate([train["image_emb"]] + [embeddings[s]["image_emb"] for s in indexed]),
    caption_emb=np.concatenate([train["caption_emb"], pseudo_emb[keep]]),
    caption_image_index=np.concatenate([train["caption_image_index"], index]),
    description=f"train pairs + {int(keep.sum())} pseudo-query pairs of {'/'.join(indexed)} images",
  )
