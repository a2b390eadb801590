"""The embed stage's hand-over: per-split embeddings and the embedded pseudo queries.

    embed/embeddings_<split>.npz   image_ids int64[N], image_emb float32[N, D],
                                   caption_image_ids int64[M], caption_emb float32[M, D]
                                   (not normalised; captions in caption_source order)
    embed/pseudo_queries.npz       image_ids int64[Q], query_emb float32[Q, D]: the prepared
                                   pseudo queries of the val / test images, file order

Large splits are written row block by row block (`NpzWriter`, avg_jax/encoders/extract.py);
the writer then records the file's checksum (`record`, in `embed/checksums.json`), and readers
here check it and what later stages rely on, and name the file in every error.
"""

import os

import numpy as np

from avg_jax.artifacts import checksums, io, paths
from avg_jax.errors import UserError

KEYS = ("image_ids", "image_emb", "caption_image_ids", "caption_emb")


def arrays(num_images: int, num_captions: int, dim: int) -> dict:
  """`{name: (dtype, shape)}` of the embeddings of `num_images` images and their captions."""
  return {
    "image_ids": (np.int64, (num_images,)),
    "image_emb": (np.float32, (num_images, dim)),
    "caption_image_ids": (np.int64, (num_captions,)),
    "caption_emb": (np.float32, (num_captions, dim)),
  }


REMEDY = "rerun `avg-jax embed` (it rewrites it)"


def record(workdir: str, path: str) -> None:
  """Records the checksum of an embed output just written (process 0)."""
  checksums.add(paths.embed_dir(workdir), os.path.relpath(path, paths.embed_dir(workdir)))


def problem(workdir: str, path: str) -> str:
  """ "" when the embed output `path` holds the bytes it was written with, else what differs."""
  return checksums.check(paths.embed_dir(workdir), os.path.relpath(path, paths.embed_dir(workdir)))


def _checked(workdir: str, path: str) -> None:
  found = problem(workdir, path)
  if found:
    raise UserError(f"{found}; {REMEDY}")


def load(workdir: str, split: str) -> dict:
  """The embeddings of `split` as stored (raises `UserError` if absent, damaged or
  unreadable)."""
  path = paths.embeddings_file(workdir, split)
  if not os.path.exists(path):
    raise UserError(f"{path} not found; run `avg-jax embed` first")
  _checked(workdir, path)
  return io.read_npz(path, KEYS, remedy=REMEDY)


def load_checked(workdir: str, split: str) -> dict | None:
  """`load`, checked for consistency, with `caption_image_index int64[M]` (each caption's
  image row) added and dtypes fixed; None when the split has no file."""
  path = paths.embeddings_file(workdir, split)
  if not os.path.exists(path):
    return None
  data = dict(load(workdir, split))
  n, m = len(data["image_ids"]), len(data["caption_image_ids"])
  if data["image_emb"].ndim != 2 or len(data["image_emb"]) != n:
    raise UserError(f"{path}: image_emb must be [{n}, D], got {list(data['image_emb'].shape)}")
  if data["caption_emb"].shape != (m, data["image_emb"].shape[1]):
    raise UserError(
      f"{path}: caption_emb must be [{m}, {data['image_emb'].shape[1]}], "
      f"got {list(data['caption_emb'].shape)}"
    )
  if len(np.unique(data["image_ids"])) != n:
    raise UserError(f"{path}: image_ids are not unique")
  order = np.argsort(data["image_ids"])
  pos = np.searchsorted(data["image_ids"], data["caption_image_ids"], sorter=order)
  pos = np.minimum(pos, n - 1)
  index = order[pos] if n else pos
  if m and (n == 0 or (data["image_ids"][index] != data["caption_image_ids"]).any()):
    raise UserError(f"{path}: caption_image_ids name images that are not in image_ids")
  data["caption_image_index"] = index.astype(np.int64)
  data["image_ids"] = data["image_ids"].astype(np.int64)
  data["image_emb"] = data["image_emb"].astype(np.float32)
  data["caption_emb"] = data["caption_emb"].astype(np.float32)
  return data


def write_pseudo_queries(workdir: str, image_ids: np.ndarray, query_emb: np.ndarray) -> str:
  """Writes `embed/pseudo_queries.npz`; -> its path."""
  path = paths.pseudo_query_embeddings_file(workdir)
  io.write_npz(path, image_ids=image_ids, query_emb=query_emb)
  record(workdir, path)
  return path


def load_pseudo_queries(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """`(image ids int64[Q], query_emb float32[Q, D])` of the prepared pseudo queries."""
  path = paths.pseudo_query_embeddings_file(workdir)
  if not os.path.exists(path):
    raise UserError(
      f"{path} not found; run `avg-jax embed` first (with the same config: it "
      f"embeds pseudo queries when tokenizer.fit_on_pseudo_queries is on)"
    )
  _checked(workdir, path)
  f = io.read_npz(path, ("image_ids", "query_emb"), remedy="delete it and rerun `avg-jax embed`")
  return f["image_ids"].astype(np.int64), f["query_emb"].astype(np.float32)
