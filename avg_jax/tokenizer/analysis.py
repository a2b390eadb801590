"""Do identifiers mean something? Attribute overlap of images that share a voken prefix.

For each prefix length n, pairs of images whose identifiers agree on their first n codes are
sampled uniformly among all such pairs, and their semantic similarity is averaged; the same
for uniformly random pairs. Semantic similarity is the Jaccard overlap of two images'
attribute sets. For a scene with an `objects` list (avg_shapes' `attributes` JSON) the facts
are each object's categorical fields (`color=red`, `shape=circle`, ...), each whole object
(`object=large red top circle`) and the object count; other JSON is flattened to `path=value`
facts (floats, e.g. coordinates, left out). Real data has no attributes: the facts are then
the content words of the image's captions.

    python -m avg_jax.tokenizer.analysis --workdir W [--schemes avg,rq,random] [--split test]
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from avg_jax.artifacts import paths, voken_tables
from avg_jax.data import dataset
from avg_jax.errors import UserError
from avg_jax.metrics import format_metric

_STOPWORDS = frozenset(
  "a an the of on in at to and or with is are was were be by for from its it this that "
  "there their his her some two one three four five as into near next while".split()
)


def _flatten(value: Any, path: str, out: set) -> None:
  if isinstance(value, dict):
    for key, item in value.items():
      _flatten(item, f"{path}.{key}" if path else str(key), out)
  elif isinstance(value, (list, tuple)):
    for item in value:  # a set of facts: list positions do not matter
      _flatten(item, path, out)
  elif isinstance(value, float):
    return  # continuous values (positions, sizes) almost never match exactly
  else:
    out.add(f"{path}={value}")


def _scene_facts(scene: dict) -> set:
  facts = {f"objects={len(scene['objects'])}"}
  for obj in scene["objects"]:
    fields = {k: v for k, v in obj.items() if isinstance(v, str)}
    facts.update(f"{k}={v}" for k, v in fields.items())
    facts.add("object=" + " ".join(fields[k] for k in sorted(fields)))
  return facts


def attribute_set(attributes_json: str, captions: Sequence[str] = ()) -> frozenset:
  """The facts describing one image (see module doc): attributes, else caption content words."""
  facts: set = set()
  if attributes_json:
    value = json.loads(attributes_json)
    if isinstance(value, dict) and isinstance(value.get("objects"), list):
      facts = _scene_facts(value)
    else:
      _flatten(value, "", facts)
  if not facts:
    for caption in captions:
      facts.update(w for w in re.findall(r"[a-z]+", caption.lower()) if w not in _STOPWORDS)
  return frozenset(facts)


def jaccard(a: frozenset, b: frozenset) -> float:
  """|a & b| / |a | b| (1.0 for two empty sets)."""
  union = len(a | b)
  return 1.0 if union == 0 else len(a & b) / union


def _sample_pairs_in_groups(
  group: np.ndarray, num_pairs: int, rng: np.random.Generator
) -> np.ndarray:
  """Uniform pairs `[n, 2]` of distinct rows with equal `group`; empty when no group has 2."""
  order = np.argsort(group, kind="stable")
  _, starts, sizes = np.unique(group[order], return_index=True, return_counts=True)
  pair_counts = sizes * (sizes - 1) / 2
  if pair_counts.sum() == 0:
    return np.zeros((0, 2), np.int64)
  chosen = rng.choice(len(sizes), size=num_pairs, p=pair_counts / pair_counts.sum())
  first = rng.integers(0, sizes[chosen])
  second = (first + rng.integers(1, sizes[chosen])) % sizes[chosen]  # distinct from first
  return np.stack([order[starts[chosen] + first], order[starts[chosen] + second]], axis=1)


def semantic_similarity(
  codes: np.ndarray,
  features: Sequence[frozenset],
  *,
  prefix_lengths: Iterable[int] = (1, 2),
  num_pairs: int = 2000,
  seed: int = 0,
) -> dict:
  """Mean Jaccard similarity of `features` for pairs sharing identifier prefixes.

  `codes [N, P]` identifiers, `features[i]` the attribute set of row i. Returns
  `{"prefix_1": {"pairs": n, "similarity": s}, ..., "random": {...}}`; a prefix length at
  which no two images agree has 0 pairs and similarity NaN.
  """
  codes = np.asarray(codes)
  n = len(codes)
  if n != len(features):
    raise ValueError(f"{n} identifiers but {len(features)} feature sets")
  rng = np.random.default_rng(seed)
  result = {}
  for length in prefix_lengths:
    _, group = np.unique(codes[:, :length], axis=0, return_inverse=True)
    pairs = _sample_pairs_in_groups(group.reshape(-1), num_pairs, rng)
    sims = [jaccard(features[i], features[j]) for i, j in pairs]
    result[f"prefix_{length}"] = dict(
      pairs=len(pairs), similarity=float(np.mean(sims)) if sims else float("nan")
    )
  if n >= 2:
    first = rng.integers(0, n, size=num_pairs)
    second = (first + rng.integers(1, n, size=num_pairs)) % n
    sims = [jaccard(features[i], features[j]) for i, j in zip(first, second)]
    result["random"] = dict(pairs=num_pairs, similarity=float(np.mean(sims)))
  else:
    result["random"] = dict(pairs=0, similarity=float("nan"))
  return result


def load_features(workdir: str, split: str, image_ids: np.ndarray) -> list | None:
  """Attribute sets for `image_ids` from the prepared dataset; None when it is not available."""
  if not os.path.exists(paths.dataset_info_file(workdir)):
    return None
  source = dataset.image_source(workdir, split)
  by_id = {}
  for i in range(len(source)):
    element = source[i]
    by_id[int(element["image_id"])] = attribute_set(
      element.get("attributes", ""), element.get("captions", ())
    )
  missing = [int(i) for i in image_ids if int(i) not in by_id]
  if missing:
    raise UserError(
      f"image id {missing[0]} of the voken table is not in the prepared "
      f"{split!r} split of {workdir}"
    )
  return [by_id[int(i)] for i in image_ids]


def format_table(rows: dict, prefix_lengths: Sequence[int] = (1, 2)) -> str:
  """`{scheme: semantic_similarity(...)}` -> a plain-text table."""
  header = ["scheme"] + [f"prefix {n} (pairs)" for n in prefix_lengths] + ["random pairs"]
  lines = [" | ".join(header), " | ".join("-" * len(h) for h in header)]
  for scheme, result in rows.items():
    cells = [scheme]
    for n in prefix_lengths:
      r = result[f"prefix_{n}"]
      # No two images share this prefix: no pairs, a dash rather than nan.
      cells.append(f"{format_metric(r['similarity'], '.3f')} ({r['pairs']})")
    cells.append(format_metric(result["random"]["similarity"], ".3f"))
    lines.append(" | ".join(cells))
  return "\n".join(lines)


def compare_schemes(
  workdir: str, schemes: Sequence[str], split: str = "test", *, num_pairs: int = 2000, seed: int = 0
) -> dict:
  """Semantic measure of each scheme's voken table in `workdir` (schemes without one skipped)."""
  rows, features = {}, None
  for scheme in schemes:
    if not os.path.exists(voken_tables.voken_table_file(workdir, scheme)):
      continue
    _, table, _ = voken_tables.load(workdir, scheme)
    if split not in table:
      continue
    image_ids, codes = table[split]
    if features is None or features[0] != tuple(image_ids):
      loaded = load_features(workdir, split, image_ids)
      if loaded is None:
        raise UserError(f"no prepared dataset in {workdir} to read attributes from")
      features = (tuple(image_ids), loaded)
    rows[scheme] = semantic_similarity(codes, features[1], num_pairs=num_pairs, seed=seed)
  return rows


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m avg_jax.tokenizer.analysis", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--schemes", default="avg,rq,hkmeans,atomic,random")
  parser.add_argument("--split", default="test")
  parser.add_argument("--pairs", type=int, default=2000)
  args = parser.parse_args(argv)
  try:
    rows = compare_schemes(args.workdir, args.schemes.split(","), args.split, num_pairs=args.pairs)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if not rows:
    print(f"no voken tables for {args.schemes} in {args.workdir}", file=sys.stderr)
    return 2
  print(f"Attribute overlap (Jaccard) of {args.split} image pairs sharing an identifier prefix")
  print(format_table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
