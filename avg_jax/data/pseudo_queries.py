"""Pseudo queries: extra (image id, query) training pairs for the images of an index.

The paper's transductive protocol trains the generator (and fits the image tokenizer) on the
training captions plus a few LLM-written queries per *indexed* image, so that the generator
learns to emit the identifiers of the images it must retrieve (docs/design.md).

Where they come from (`prepare` writes them into `prepared/pseudo_queries.jsonl`):
  * `avg_shapes`: generated from each scene (`shapes.pseudo_queries`), for every image of
    every split, `data.pseudo_queries_per_image` each;
  * Karpathy data: the file named by `data.pseudo_queries` (empty: none), JSON lines
    `{"image_id": <imgid>, "query": "..."}`, any image of any split.

Which of them a stage uses is the protocol's business (`config.protocol`): "transductive"
uses those of the non-training (indexed) images, "inductive" none.
"""

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from avg_jax.artifacts import paths
from avg_jax.errors import UserError

FILE_NAME = "pseudo_queries.jsonl"
PROTOCOLS = ("transductive", "inductive")


def prepared_file(workdir: str) -> str:
  return os.path.join(paths.prepared_dir(workdir), FILE_NAME)


def read_user_file(path: str, known_ids: set[int]) -> list[tuple[int, str]]:
  """`[(image id, query)]` from a user's JSON-lines file; errors name the file and line.

  Every image id must be one of `known_ids` (an image of the prepared dataset, any split).
  """
  if not os.path.isfile(path):
    raise UserError(f"config data.pseudo_queries: file not found: {path}")
  out = []
  try:
    with open(path, encoding="utf-8") as f:
      lines = list(f)
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from e
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      image_id, query = record["image_id"], record["query"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise UserError(
        f'{path}:{n}: expected {{"image_id": int, "query": str}} ({type(e).__name__})'
      ) from e
    if not isinstance(image_id, int) or isinstance(image_id, bool):
      raise UserError(f"{path}:{n}: image_id must be an integer, got {image_id!r}")
    if not isinstance(query, str) or not query.strip():
      raise UserError(f"{path}:{n}: query must be a non-empty string")
    if image_id not in known_ids:
      raise UserError(f"{path}:{n}: image id {image_id} is not an image of the dataset")
    out.append((image_id, query.strip()))
  return out


def write(path: str, pairs: Iterable[tuple[int, str]]) -> int:
  """Writes `(image id, query)` pairs as JSON lines; -> the number written."""
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for image_id, query in pairs:
      f.write(json.dumps({"image_id": int(image_id), "query": query}) + "\n")
      count += 1
  return count


def read(path: str) -> tuple[np.ndarray, list[str]]:
  """`(image ids int64[M], M queries)` of a file written by `write` (empty when absent)."""
  if not os.path.exists(path):
    return np.zeros((0,), np.int64), []
  ids, queries = [], []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      try:
        record = json.loads(line)
        ids.append(int(record["image_id"]))
        queries.append(str(record["query"]))
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(
          f"{path}:{n}: damaged pseudo query line ({type(e).__name__}); rerun "
          f"`avg-jax prepare` in a fresh workdir"
        ) from e
  return np.asarray(ids, np.int64), queries


def load(workdir: str) -> tuple[np.ndarray, list[str]]:
  """The prepared dataset's pseudo queries: `(image ids int64[M], M queries)`."""
  return read(prepared_file(workdir))


def of_images(workdir: str, image_ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """The prepared pseudo queries whose image is in `image_ids [N]`, in file order."""
  ids, queries = load(workdir)
  keep = np.isin(ids, np.asarray(image_ids, np.int64))
  return ids[keep], [q for q, k in zip(queries, keep) if k]


def check_protocol(protocol: str) -> str:
  if protocol not in PROTOCOLS:
    raise UserError(f"config key protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
  return protocol


def shapes_pairs(records_by_split: dict, seed: int, per_image: int) -> Iterator[tuple[int, str]]:
  """Generated pseudo queries of every `avg_shapes` record (`{split: record source}`)."""
  from avg_jax.data import shapes  # pylint: disable=import-outside-toplevel

  for split, records in records_by_split.items():
    for i in range(len(records)):
      record = records[i]
      attributes = record["attributes"]
      attributes = attributes.decode("utf-8") if isinstance(attributes, bytes) else attributes
      rng = shapes.pseudo_query_rng(seed, split, i)
      for query in shapes.pseudo_queries(attributes, rng, per_image):
        yield int(record["image_id"]), query
