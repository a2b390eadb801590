"""Recall@K of images added live, next to the same images indexed at export.

The inductive generator (and the RQ tokenizer fit on training pairs) never saw the test
images. An export of it whose base index is the val split gets the test images added live
(`Retriever.add`, from their prepared bytes: the road a user's image takes), then the val
images are removed, so the index holds the test images alone, as `evaluate` indexes them.
Every test caption is a query; a hit is the caption's image among the top k.

Rows: the live index (val + test, then test alone), and the static exports given with
`--static NAME=EXPORT` (e.g. the transductive and inductive generators' exports of the test
split), each searched with the same captions through the same `Retriever.search`.

    python benchmarks/live_accuracy.py --workdir W --export EXPORT_OF_VAL \\
        --static transductive=EXP_T --static inductive=EXP_I --out results.json
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax.artifacts import embeddings as embeddings_lib  # noqa: E402
from avg_jax.artifacts import (
  io,  # noqa: E402
  voken_tables,  # noqa: E402
)
from avg_jax.bench import common  # noqa: E402
from avg_jax.data import dataset  # noqa: E402
from avg_jax.inference.retriever import Retriever  # noqa: E402

KS = (1, 5, 10)


def recall(retriever: Retriever, captions: list[str], truth: np.ndarray) -> dict:
  """Recall@K (%) of `captions` whose image `truth [Q]` is among the top K."""
  retriever.search(captions[: len(captions) // 2 or 1], k=max(KS))  # compiles (not timed)
  t0 = time.perf_counter()
  ids, _ = retriever.search(captions, k=max(KS))
  seconds = time.perf_counter() - t0
  out = {f"R@{k}": float(100 * np.mean((ids[:, :k] == truth[:, None]).any(1))) for k in KS}
  return dict(
    out,
    queries=len(captions),
    queries_per_s=len(captions) / seconds,
    indexed=int(len(retriever.image_ids)),
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="the smoke run (prepared data)")
  parser.add_argument("--export", required=True, help="export whose base index is val")
  parser.add_argument("--static", action="append", default=[], help="NAME=EXPORT")
  parser.add_argument("--split", default="test")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)

  source = dataset.image_source(args.workdir, args.split, decode_image=False)
  records = [source[i] for i in range(len(source))]
  ids = np.array([int(r["image_id"]) for r in records], np.int64)
  data = [bytes(r["image"]) for r in records]
  caption_lists = [list(r["captions"]) for r in records]
  captions = [c for cs in caption_lists for c in cs]
  truth = np.repeat(ids, [len(cs) for cs in caption_lists])
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    export = os.path.join(tmp, "export")
    shutil.copytree(args.export, export)
    retriever = Retriever.load(export)
    base_ids = retriever.image_ids.copy()
    t0 = time.perf_counter()
    retriever.add(
      data, ids=ids, captions=caption_lists, file_names=[str(r["file_name"]) for r in records]
    )
    add_s = time.perf_counter() - t0
    # Does the live road reproduce the embed and tokenize stages on these images?
    emb = embeddings_lib.load(args.workdir, args.split)
    row = {int(i): r for r, i in enumerate(emb["image_ids"])}
    again, _, _ = retriever.embed_images(data)
    emb_diff = float(np.max(np.abs(again - emb["image_emb"][[row[int(i)] for i in ids]])))
    live = retriever.state.live
    tok_name = retriever.manifest["live"]["tokenizer"]
    table = io.read_npz(
      voken_tables.voken_table_file(args.workdir, tok_name),
      (f"{args.split}_image_ids", f"{args.split}_codes"),
    )
    trow = {int(i): r for r, i in enumerate(table[f"{args.split}_image_ids"])}
    levels = retriever.vocab.num_levels
    expected = table[f"{args.split}_codes"][[trow[int(i)] for i in live.delta_ids]][:, :levels]
    agree = float(np.mean(np.all(live.delta_codes[:, :levels] == expected, axis=1)))
    rows.append(
      dict(
        index=f"live: val at export + {args.split} added",
        add_s=add_s,
        images_per_s=len(ids) / add_s,
        **recall(retriever, captions, truth),
      )
    )
    t0 = time.perf_counter()
    retriever.remove(base_ids)
    rows.append(
      dict(
        index=f"live: {args.split} added, val removed",
        remove_s=time.perf_counter() - t0,
        **recall(retriever, captions, truth),
      )
    )
  for spec in args.static:
    name, path = spec.split("=", 1)
    rows.append(
      dict(index=f"static export: {name}", **recall(Retriever.load(path), captions, truth))
    )
  print(
    f"{len(ids)} {args.split} images, {len(captions)} captions; live codes equal the "
    f"voken table's for {agree:.1%}; embeddings differ by at most {emb_diff}"
  )
  print(f"{'index':<44} {'N':>5} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'q/s':>6}")
  for r in rows:
    print(
      f"{r['index']:<44} {r['indexed']:>5} {r['R@1']:>6.1f} {r['R@5']:>6.1f} "
      f"{r['R@10']:>6.1f} {r['queries_per_s']:>6.1f}"
    )
  record = dict(
    bench="live_accuracy",
    split=args.split,
    images=len(ids),
    captions=len(captions),
    code_agreement=agree,
    max_embedding_diff=emb_diff,
    rows=rows,
    machine=common.machine_info(" ".join([sys.executable] + sys.argv)),
  )
  io.write_json(args.out, record, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
