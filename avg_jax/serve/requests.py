"""Request bodies -> validated searches and index changes; anything wrong is an `ApiError`
naming the field.

    POST /v1/search  {"queries": ["a red circle", ...], "k": 10}

`queries`: a non-empty list of at most `max_queries` strings, each accepted by
`Retriever.validate` (non-empty, at most `max_query_chars` characters) and encodable as UTF-8
(JSON can carry lone surrogates, which the text tokenizer cannot take). `k`: optional
integer in [1, max_k] (default `default_k`); booleans and floats are refused. Unknown keys are
refused, so a misspelt `"K"` is not silently ignored.

    POST /v1/images  {"images": [{"data": "<base64 PNG/JPEG/WebP/SVG bytes>", "id": 17,
                                  "captions": ["..."], "file_name": "a.png"}, ...]}

`images`: a non-empty list of at most `max_images` objects; `data` (required) is standard
base64 of an encoded image (decoded later, out of process: avg_jax/serve/uploads.py); `id`
(optional, an integer in [0, 2^31 - 1]; default: the next free ids), `captions` (optional
list of at most 32 strings of at most 2 000 characters) and `file_name` (optional string of
at most 1 024 characters). Either every image gives an `id` or none does.

Ids in URLs (`/v1/images/{id}`) are decimal ASCII digits in [0, 2^31 - 1]: no sign, no `_`,
no other script's digits (Python's `int` takes them all).
"""

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from avg_jax.errors import UserError
from avg_jax.inference import live_index as live_lib


class ApiError(Exception):
  """An HTTP error answered as `{"error": {"field": ..., "message": ...}}`."""

  def __init__(self, status: int, field: str | None, message: str):
    super().__init__(message)
    self.status = status
    self.field = field
    self.message = message

  def body(self) -> dict:
    return {"error": {"field": self.field, "message": self.message}}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_k: int  # largest k served (compiled at start); at most the index size
  default_k: int
  max_queries: int  # queries in one request
  max_query_chars: int


@dataclasses.dataclass(frozen=True)
class SearchRequest:
  queries: list[str]
  k: int


def parse_json(body: bytes) -> Any:
  """The decoded JSON document of a request body (`ApiError` 400 on field "body")."""
  try:
    return json.loads(body.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ApiError(400, "body", f"not UTF-8 (byte {e.start})") from e
  except json.JSONDecodeError as e:
    raise ApiError(
      400, "body", f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}"
    ) from e
  except RecursionError as e:
    raise ApiError(400, "body", "JSON nested too deeply") from e
  except ValueError as e:  # an integer of more than 4 300 digits (Python's int limit)
    raise ApiError(400, "body", f"malformed JSON: {str(e).split(';')[0][:120]}") from e


def parse_search(
  document: Any, limits: Limits, validate_query: Callable[[Sequence[str]], list[str]]
) -> SearchRequest:
  """Checks a decoded `/v1/search` document; `validate_query` is `Retriever.validate`."""
  if not isinstance(document, dict):
    raise ApiError(400, "body", f"expected a JSON object, got {_json_type(document)}")
  unknown = sorted(set(document) - {"queries", "k"})
  if unknown:
    raise ApiError(400, unknown[0], "unknown field (expected queries, k)")
  if "queries" not in document:
    raise ApiError(400, "queries", "required")
  queries = document["queries"]
  if not isinstance(queries, list):
    raise ApiError(400, "queries", f"expected a list of strings, got {_json_type(queries)}")
  if not queries:
    raise ApiError(400, "queries", "empty list")
  if len(queries) > limits.max_queries:
    raise ApiError(400, "queries", f"{len(queries)} queries, the limit is {limits.max_queries}")
  for i, q in enumerate(queries):
    field = f"queries[{i}]"
    if not isinstance(q, str):
      raise ApiError(400, field, f"expected a string, got {_json_type(q)}")
    try:
      q.encode("utf-8")
    except UnicodeEncodeError as e:
      raise ApiError(
        400, field, f"not valid Unicode (lone surrogate at character {e.start})"
      ) from e
    try:
      validate_query([q])
    except UserError as e:
      # The Retriever names the query "query 0" (it saw one); the field says which it was.
      raise ApiError(400, field, str(e).removeprefix("query 0: ")) from e
  k = document.get("k", limits.default_k)
  if isinstance(k, bool) or not isinstance(k, int):
    raise ApiError(400, "k", f"expected an integer, got {_json_type(k)}")
  if not 1 <= k <= limits.max_k:
    raise ApiError(400, "k", f"must be in [1, {limits.max_k}], got {k}")
  return SearchRequest(queries=list(queries), k=k)


@dataclasses.dataclass(frozen=True)
class AddRequest:
  images: list[bytes]
  ids: list[int] | None
  captions: list[list[str]]
  file_names: list[str]


_IMAGE_KEYS = ("data", "id", "captions", "file_name")


def parse_add(document: Any, max_images: int) -> AddRequest:
  """Checks a decoded `POST /v1/images` document (module doc); the images are decoded
  afterwards (uploads.py), each error naming its field, before the index changes."""
  if not isinstance(document, dict):
    raise ApiError(400, "body", f"expected a JSON object, got {_json_type(document)}")
  unknown = sorted(set(document) - {"images"})
  if unknown:
    raise ApiError(400, unknown[0], "unknown field (expected images)")
  items = document.get("images")
  if not isinstance(items, list) or not items:
    raise ApiError(400, "images", "expected a non-empty list of image objects")
  if len(items) > max_images:
    raise ApiError(400, "images", f"{len(items)} images, the limit is {max_images}")
  images, ids, captions, names = [], [], [], []
  for i, item in enumerate(items):
    where = f"images[{i}]"
    if not isinstance(item, dict):
      raise ApiError(400, where, f"expected an object, got {_json_type(item)}")
    extra = sorted(set(item) - set(_IMAGE_KEYS))
    if extra:
      raise ApiError(
        400, f"{where}.{extra[0]}", f"unknown field (expected {', '.join(_IMAGE_KEYS)})"
      )
    data = item.get("data")
    if not isinstance(data, str):
      raise ApiError(400, f"{where}.data", f"expected a base64 string, got {_json_type(data)}")
    try:
      raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
      raise ApiError(400, f"{where}.data", f"not valid base64 ({e})") from e
    if not raw:
      raise ApiError(400, f"{where}.data", "empty (0 bytes)")
    images.append(raw)
    if "id" in item:
      value = item["id"]
      if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= live_lib.MAX_ID:
        raise ApiError(400, f"{where}.id", f"expected an integer in [0, {live_lib.MAX_ID}]")
      ids.append(value)
    caps = item.get("captions", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
      raise ApiError(400, f"{where}.captions", "expected a list of strings")
    if len(caps) > live_lib.MAX_CAPTIONS:
      raise ApiError(
        400, f"{where}.captions", f"{len(caps)} captions, the limit is {live_lib.MAX_CAPTIONS}"
      )
    for j, caption in enumerate(caps):
      _check_text(caption, f"{where}.captions[{j}]", live_lib.MAX_CAPTION_CHARS)
    captions.append(caps)
    name = item.get("file_name", "")
    if not isinstance(name, str):
      raise ApiError(400, f"{where}.file_name", f"expected a string, got {_json_type(name)}")
    _check_text(name, f"{where}.file_name", live_lib.MAX_FILE_NAME_CHARS)
    names.append(name)
  if ids and len(ids) != len(items):
    raise ApiError(400, "images", "give an id for every image or for none")
  return AddRequest(images=images, ids=ids or None, captions=captions, file_names=names)


def _check_text(text: str, field: str, limit: int) -> None:
  if len(text) > limit:
    raise ApiError(400, field, f"{len(text)} characters, the limit is {limit}")
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ApiError(400, field, f"not valid Unicode (lone surrogate at character {e.start})") from e


def parse_image_id(text: str) -> int:
  """The `{id}` of `/v1/images/{id}` (module doc; `ApiError` 400 on field "id")."""
  try:
    return live_lib.parse_id(text)
  except ValueError as e:
    raise ApiError(400, "id", str(e)) from e


def _json_type(value: Any) -> str:
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, (int, float)):
    return "number"
  if isinstance(value, str):
    return "string"
  if isinstance(value, list):
    return "list"
  if isinstance(value, dict):
    return "object"
  return type(value).__name__
