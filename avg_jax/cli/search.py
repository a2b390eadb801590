"""`avg-jax search --model EXPORT "query" ...`: ranked images (file name, score, id, and a
caption when the export holds them) per query.

Reads one query per line from stdin when none are given. Queries are bytes until the
Retriever checks them, so a query that is not valid UTF-8 (on the command line or on stdin)
is a one-line error naming it. `--json` prints one JSON object per query:
{"query", "results": [{"rank", "image_id", "file_name", "score"[, "caption"]}]}.

File names and captions of images added through the service come from its clients: the text
output escapes their control characters (`terminal.safe`), so none reaches the terminal as a
command; JSON escapes them itself.
"""

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from avg_jax.inference.retriever import Retriever
from avg_jax.inference.terminal import safe


def _caption_of(retriever: Retriever) -> Callable[[int], str] | None:
  """A function image id -> first caption ("" when unknown), when the export holds
  captions (`Retriever.caption`, or its gallery's `captions`); else None."""
  caption = getattr(retriever, "caption", None)
  if callable(caption):
    return lambda image_id: str(caption(image_id) or "")
  gallery = getattr(retriever, "gallery", None)
  if gallery is not None and callable(getattr(gallery, "captions", None)):
    return lambda image_id: next(iter(gallery.captions(image_id)), "")
  added = getattr(retriever, "added_captions", None)
  if callable(added):  # captions given with images added live
    return lambda image_id: next(iter(added(image_id)), "")
  return None


def main(args) -> int:
  # The shell hands Python argv bytes decoded with surrogateescape: turn them back into the
  # user's bytes so that invalid UTF-8 gets the same error as on stdin.
  queries = [os.fsencode(q) for q in args.queries]
  if not queries:
    lines = [
      line.rstrip("\n")
      for line in sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape").splitlines()
      if line.strip()
    ]
    queries = [q.encode("utf-8", errors="surrogateescape") for q in lines]
  retriever = Retriever.load(args.model)
  texts = retriever.validate(queries)
  ids, scores = retriever.search(texts, k=args.k)
  caption_of = _caption_of(retriever)
  for text, row_ids, row_scores in zip(texts, ids, scores):
    results: list[dict[str, Any]] = []
    for r, (i, s) in enumerate(zip(row_ids, row_scores)):
      if i < 0:
        continue
      result = {
        "rank": r + 1,
        "image_id": int(i),
        "file_name": retriever.file_name(i),
        "score": float(s),
      }
      if caption_of is not None:
        result["caption"] = caption_of(int(i))
      results.append(result)
    if args.json:
      print(json.dumps({"query": text, "results": results}))
      continue
    print(f"query: {safe(text)}")
    if not results:
      print("  (no results)")
    for row in results:
      caption = f'  "{safe(row["caption"])}"' if row.get("caption") else ""
      print(
        f"  {row['rank']:>3}. {safe(row['file_name']) or '(no file name)'}  score "
        f"{row['score']:.4f}  image {row['image_id']}{caption}"
      )
  return 0
