"""How much of the retrieval signal do the identifiers keep? Measured on a split, no generator.

    python benchmarks/identifier_bound.py --workdir runs/emoji --config configs/emoji.py \\
        --splits val --out benchmarks/results/identifier_bound.json

For a workdir whose `tokenize` stage finished (avg or rq scheme), per caption of the split:
- two_tower: the dual encoder's ranking, cos(caption, image) (the baseline's R@K);
- decoded: the same ranking with each image replaced by the decoding of its semantic code
  (the RQ-VAE decoder of the summed codewords), ties by cos(caption, image): what a retriever
  that sees an image only through its code and the text only through the dual encoder can do;
- perfect_generator: R@1 if the generator emitted exactly the image's code every time and the
  images sharing that code were ordered at random (mean of 1 / group size): AVG's ceiling with
  these identifiers whatever the generator learns;
- collision: the share of the split's images whose code another image of the split shares.
Prints a table and writes a JSON file with the command and the machine.
"""

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax import config as config_lib  # noqa: E402
from avg_jax.artifacts import embeddings, io, paths, voken_tables  # noqa: E402
from avg_jax.bench import common  # noqa: E402
from avg_jax.errors import UserError  # noqa: E402

KS = (1, 5, 10)


def recall_at(scores: np.ndarray, caption_image: np.ndarray, ks=KS) -> dict:
  """`scores [captions, images]`, `caption_image int[captions]` -> {k: R@k in %}; a tie is
  ordered by the lower image row (stable sort), so callers break ties in the scores."""
  order = np.argsort(-scores, axis=1, kind="stable")
  return {k: float(np.mean((order[:, :k] == caption_image[:, None]).any(axis=1)) * 100) for k in ks}


def perfect_generator_r1(codes: np.ndarray, caption_image: np.ndarray) -> float:
  """`codes int[images, L]`: R@1 (%) of a generator that always emits the caption's image
  code, the images sharing it in random order (expected value: 1 / group size)."""
  groups = collections.Counter(map(tuple, codes))
  return float(np.mean([1.0 / groups[tuple(codes[i])] for i in caption_image]) * 100)


def collision_share(codes: np.ndarray) -> float:
  """Share (%) of images whose code at least one other image has."""
  groups = collections.Counter(map(tuple, codes))
  return float(np.mean([groups[tuple(c)] > 1 for c in codes]) * 100)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def measure(config, workdir: str, split: str, table_name: str) -> dict:
  """The measures of the module docstring for one split."""
  import jax

  from avg_jax.tokenizer import model as model_lib
  from avg_jax.tokenizer import quantizer, schemes

  vocab, table, _ = voken_tables.load(workdir, table_name)
  data = embeddings.load_checked(workdir, split)
  if data is None or split not in table:
    raise UserError(f"{workdir}: no {split} split in the embeddings or the voken table")
  image_ids, codes = table[split]
  if not np.array_equal(np.asarray(image_ids), np.asarray(data["image_ids"])):
    raise UserError(f"{workdir}: the voken table's {split} images differ from the embeddings'")
  codes = np.asarray(codes)[:, : vocab.num_levels]
  image, caption = _unit(data["image_emb"]), _unit(data["caption_emb"])
  caption_image = np.asarray(data["caption_image_index"])
  similarity = caption @ image.T
  rq_config, params, batch_stats = schemes.final_rqvae(
    config, paths.tokenizer_dir(workdir, table_name), image.shape[1]
  )
  model = model_lib.RQVAE(rq_config)
  quantized = quantizer.decode_codes(jax.numpy.asarray(codes), params["codebooks"])
  decoded = np.asarray(
    model.apply(
      {"params": params, "batch_stats": batch_stats},
      quantized,
      train=False,
      method=model_lib.RQVAE.decode,
    )
  )
  # The tie term is far below any difference of two float32 cosines of distinct codes.
  decoded_scores = caption @ _unit(decoded).T + 1e-6 * similarity
  return {
    "split": split,
    "table": table_name,
    "images": int(len(codes)),
    "captions": int(len(caption_image)),
    "levels": int(vocab.num_levels),
    "two_tower": recall_at(similarity, caption_image),
    "decoded": recall_at(decoded_scores, caption_image),
    "perfect_generator_r1": perfect_generator_r1(codes, caption_image),
    "collision": collision_share(codes),
  }


def table_text(rows: list) -> str:
  lines = [
    "split | table | L | images | two-tower R@1/5/10 | decoded R@1/5/10 | "
    "perfect generator R@1 | collision %"
  ]
  for r in rows:
    tt = "/".join(f"{r['two_tower'][k]:.1f}" for k in KS)
    dec = "/".join(f"{r['decoded'][k]:.1f}" for k in KS)
    lines.append(
      f"{r['split']} | {r['table']} | {r['levels']} | {r['images']} | {tt} | {dec} | "
      f"{r['perfect_generator_r1']:.1f} | {r['collision']:.1f}"
    )
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a workdir with tokenize done")
  p.add_argument("--config", default="configs/smoke.py")
  p.add_argument(
    "--table", default="", help="voken table (default: avg+pseudo if present, else avg)"
  )
  p.add_argument("--splits", default="val")
  p.add_argument("--out", required=True)
  p.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
  args = p.parse_args(argv)
  try:
    config = config_lib.load_config(args.config, args.overrides)
    name = args.table or next(
      (
        n
        for n in ("avg" + voken_tables.PSEUDO_SUFFIX, "avg")
        if os.path.isdir(paths.tokenizer_dir(args.workdir, n))
      ),
      "avg",
    )
    rows = [measure(config, args.workdir, s, name) for s in args.splits.split(",")]
  except UserError as e:
    print(f"identifier_bound: {e}", file=sys.stderr)
    return 2
  print(table_text(rows))
  command = " ".join(
    ["python", "benchmarks/identifier_bound.py", *(argv if argv is not None else sys.argv[1:])]
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  io.write_json(
    args.out,
    {
      "workdir": args.workdir,
      "config": args.config,
      "rows": rows,
      "machine": common.machine_info(command=command),
    },
  )
  print(f"results in {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
