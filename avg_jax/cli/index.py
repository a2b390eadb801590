"""`avg-jax index add|remove|list --model EXPORT ...`: the live index from the command line.

    avg-jax index add --model EXPORT a.jpg b.png photos/          image files and folders
    avg-jax index add --model EXPORT --karpathy dataset.json --images-dir DIR [--split test]
    avg-jax index remove --model EXPORT 17 42
    avg-jax index list --model EXPORT [--json]

`add` gives files new ids after the largest indexed one (a Karpathy file's images keep their
`imgid` and captions); a folder adds its image files (by extension, sorted, not recursive).
Every image is checked first: one that cannot be used stops the command before anything
changes, with `prepare`'s reason. The change is one new live version (avg_jax/inference/
live_index.py): a crash leaves the previous one; a second writer gets a clear error.
"""

import json
import os

import numpy as np

from avg_jax.data import karpathy
from avg_jax.errors import UserError
from avg_jax.inference.terminal import safe

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".svg", ".svgz")


def add_arguments(sub) -> None:
  """The `index` command's sub-commands on an argparse sub-parser collection."""
  p = sub.add_parser("index", help="add / remove / list images of an export's live index")
  actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
  add = actions.add_parser("add", help="add images (files, folders, or a Karpathy JSON)")
  add.add_argument("paths", nargs="*", help="image files or folders of images")
  add.add_argument("--karpathy", default="", help="a Karpathy split JSON (ids and captions)")
  add.add_argument("--images-dir", default="", help="with --karpathy: the image folder")
  add.add_argument("--split", default="", help="with --karpathy: only this split")
  remove = actions.add_parser("remove", help="remove images by id")
  remove.add_argument("ids", nargs="+", help="image ids")
  show = actions.add_parser("list", help="the live changes and counts")
  show.add_argument("--json", action="store_true", help="one JSON object")
  for p in (add, remove, show):
    p.add_argument("--model", required=True, help="exported serving checkpoint directory")
    p.add_argument("--debug", action="store_true")


def _files(paths: list[str]) -> list[str]:
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(
        os.path.join(path, n)
        for n in os.listdir(path)
        if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(path, n))
      )
      if not found:
        raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
      out += found
    else:
      out.append(path)  # a missing or bad file is reported by the image check
  return out


def _karpathy_images(args) -> tuple[list[str], list[int], list[list[str]], list[str]]:
  if args.paths:
    raise UserError("index add: give image paths or --karpathy, not both")
  entries = karpathy.read_entries(args.karpathy, args.images_dir)
  if args.split and args.split not in entries:
    raise UserError(f"index add --split: {args.split!r} is not one of {', '.join(karpathy.SPLITS)}")
  chosen = [e for s in ([args.split] if args.split else karpathy.SPLITS) for e in entries[s]]
  if not chosen:
    raise UserError(
      f"{args.karpathy}: no images" + (f" in split {args.split!r}" if args.split else "")
    )
  return (
    [e.path for e in chosen],
    [e.image_id for e in chosen],
    [list(e.captions) for e in chosen],
    [e.file_name for e in chosen],
  )


def parse_ids(texts: list[str]) -> list[int]:
  """Image ids given on the command line: ASCII digits in [0, 2^31 - 1] (`parse_id`)."""
  from avg_jax.inference.live_index import parse_id

  out = []
  for text in texts:
    try:
      out.append(parse_id(text))
    except ValueError as e:
      raise UserError(f"index remove: {safe(str(e))}") from e
  return out


def summary(retriever) -> dict:
  """The live changes of a `Retriever`'s index, as `list --json` prints them."""
  live = retriever.state.live
  return {
    "version": int(live.version),
    "base_images": int(len(live.base_ids)),
    "added": [int(i) for i in live.delta_ids],
    "removed": [int(i) for i in live.removed],
    "indexed": int(len(retriever.image_ids)),
  }


def main(args) -> int:
  from avg_jax.inference.retriever import Retriever  # jax loads here, not for `--help`

  retriever = Retriever.load(args.model)
  if args.action == "add":
    if args.karpathy:
      images, ids, captions, names = _karpathy_images(args)
    elif args.paths:
      images, ids, captions, names = _files(args.paths), None, None, None
    else:
      raise UserError("index add: give image files, folders, or --karpathy JSON --images-dir")
    added = retriever.add(images, ids=ids, captions=captions, file_names=names, progress_bar=True)
    print(
      f"index: added {len(added)} images (ids {_span(added)}); "
      f"{len(retriever.image_ids)} indexed, version {retriever.state.live.version}"
    )
  elif args.action == "remove":
    ids = parse_ids(args.ids)
    retriever.remove(ids)
    print(
      f"index: removed {len(ids)} images; {len(retriever.image_ids)} indexed, version "
      f"{retriever.state.live.version}"
    )
  else:
    s = summary(retriever)
    if args.json:
      print(json.dumps(s))
    else:
      print(
        f"version {s['version']}: {s['indexed']} images indexed = {s['base_images']} at "
        f"export + {len(s['added'])} added - {len(s['removed'])} removed"
      )
      for name in ("added", "removed"):
        if s[name]:
          print(f"  {name}: {_span(np.asarray(s[name]))}")
  return 0


def _span(ids: np.ndarray, show: int = 10) -> str:
  values = [int(i) for i in ids]
  text = " ".join(str(i) for i in values[:show])
  return text + (f" ... ({len(values) - show} more)" if len(values) > show else "")
