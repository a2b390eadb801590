"""`avg-jax search --model EXPORT "query" ...`: ranked image ids (and file names) per query.

Reads one query per line from stdin when none are given. `--json` prints one JSON object per
query: {"query", "results": [{"rank", "image_id", "file_name", "score"}]}.
"""

import json
import sys

from avg_jax.export.serving import Retriever


def main(args) -> int:
  queries = list(args.queries)
  if not queries:
    queries = [line.rstrip("\n") for line in sys.stdin.buffer.read().decode(
        "utf-8", errors="surrogateescape").splitlines() if line.strip()]
    queries = [q.encode("utf-8", errors="surrogateescape") for q in queries]
  retriever = Retriever.load(args.model)
  ids, scores = retriever.search(queries, k=args.k)
  texts = retriever.validate(queries)
  for text, row_ids, row_scores in zip(texts, ids, scores):
    results = [{"rank": r + 1, "image_id": int(i), "file_name": retriever.file_name(i),
                "score": float(s)} for r, (i, s) in enumerate(zip(row_ids, row_scores))
               if i >= 0]
    if args.json:
      print(json.dumps({"query": text, "results": results}))
    else:
      print(f"query: {text}")
      for r in results:
        print(f"  {r['rank']:>3}  {r['image_id']:>8}  {r['score']:>9.4f}  {r['file_name']}")
  return 0
