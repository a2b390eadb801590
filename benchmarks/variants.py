"""Which settings help? Pipeline variants measured on validation, paired against a baseline.

For a workdir whose `prepare` and `embed` stages finished, each variant (config overrides) runs
the `tokenize`, `train` (and, with `--stage rank`, `rank`) stages in its own copy of the
workdir, once per seed (`seed` and `loader.shuffle_seed`), and is evaluated on every caption
of the chosen splits with the constrained search, as `avg-jax evaluate` does. A variant whose
tokenizer settings and seed are those of a voken table the workdir already holds starts from a
copy of it. Differences to the baseline variant (the first one, or `--baseline`) are paired
per query, with a 95 % bootstrap interval over queries (seeds averaged first). Prints a table
and writes a JSON file. Choose settings on `val`; report `test` once, for the final choice.

    python benchmarks/variants.py --workdir runs/smoke --out benchmarks/results/v.json \\
        --variant base= --variant "t05=train.temperature=0.5" --splits val --seeds 0,1

A variant is `name=override[,override...]` (an empty list keeps the config). Rank variants
(`--stage rank`) that share their generator start from one trained copy of it. `--keep DIR`
keeps each variant's workdir in DIR/<name>-<seed> and reuses it when run again, so that
evaluation-only changes (e.g. `decode.tie_break=image_id` vs `similarity`, which share the
generator) can be measured without retraining: variants whose overrides differ only in
`decode.*` keys other than `decode.tie_break=learned` share one trained workdir.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avg_jax import config as config_lib  # noqa: E402
from avg_jax.artifacts import fingerprint, paths  # noqa: E402
from avg_jax.bench import common  # noqa: E402
from avg_jax.data import pseudo_queries as pseudo_lib  # noqa: E402
from avg_jax.errors import UserError  # noqa: E402
from avg_jax.evaluation import avg_eval  # noqa: E402
from avg_jax.stages import rank, tokenize, train  # noqa: E402
from avg_jax.tokenizer import fit as fit_lib  # noqa: E402
from avg_jax.training import state as state_lib  # noqa: E402

KS = (1, 5, 10)
BOOTSTRAP = 4000
# Workdir parts a variant starts from (the rest it makes itself).
_INPUTS = ("prepared", "embed", "metrics.jsonl")


def parse_variant(text: str) -> tuple[str, list[str]]:
  """`name=o1,o2` -> (name, [o1, o2]); overrides may not contain commas."""
  name, sep, rest = text.partition("=")
  if not sep or not name:
    raise UserError(f"--variant {text!r}: expected name=override[,override...]")
  return name, [o for o in rest.split(",") if o]


def training_key(overrides: list[str], stage: str = "rank") -> tuple[str, ...]:
  """The overrides that can change what `stage` (and the stages before it) trains: all but
  search-only `decode.*` keys (the tie-break matters only between "learned" and the others),
  and, for the train stage, `rank.*` keys."""
  out = []
  for o in overrides:
    key, _, value = o.partition("=")
    if key == "decode.tie_break":
      out.append("decode.tie_break=learned" if value == "learned" else "")
    elif not key.startswith("decode.") and not (stage == "train" and key.startswith("rank.")):
      out.append(o)
  return tuple(sorted(o for o in out if o))


def seed_from(source: str, target: str) -> None:
  """Copies the tokenizer and train outputs of a variant workdir into a fresh one, so that a
  rank variant starts from the same finished generator without training it again."""
  for name in ("tokenizer", "train"):
    if os.path.isdir(os.path.join(source, name)):
      shutil.copytree(os.path.join(source, name), os.path.join(target, name), dirs_exist_ok=True)


def hit_ranks(config, workdir: str, stage: str, splits) -> dict:
  """`{split: {"image": int[Q], "code": int[Q]}}`: rank of the true image among the returned
  ids, and of its semantic codes among the generated sequences (10 when absent)."""
  gen, mesh, params, shardings = state_lib.final_params(
    config, workdir, config.tokenizer.scheme, stage
  )
  out = {}
  for split in splits:
    m = avg_eval.evaluate_recall(gen, params, shardings, mesh, config, workdir, split)
    res, true_ids = m["_results"], m["_true_ids"]
    found = res["item_ids"] == true_ids[:, None]  # [Q, k]
    k = found.shape[1]
    image_ids, codes = gen.table[split]
    row_of = {int(i): r for r, i in enumerate(image_ids)}
    levels = gen.vocab.num_levels
    true_codes = codes[[row_of[int(i)] for i in true_ids], :levels]
    code_hit = np.all(res["sequences"][:, :, :levels] == true_codes[:, None], axis=-1)
    out[split] = {
      "image": np.where(found.any(axis=1), found.argmax(axis=1), k),
      "code": np.where(code_hit.any(axis=1), code_hit.argmax(axis=1), k),
    }
  return out


def make_copy(workdir: str, target: str) -> str:
  """A fresh workdir at `target` holding only the prepared data and embeddings of `workdir`."""
  os.makedirs(target, exist_ok=True)
  for name in _INPUTS:
    source = os.path.join(workdir, name)
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(target, name), dirs_exist_ok=True)
    elif os.path.exists(source):
      shutil.copyfile(source, os.path.join(target, name))
  return target


def reuse_tokenizer(config, source: str, target: str) -> None:
  """Copies the voken table `config` uses from the source workdir into the variant's when the
  source's was made from the same inputs (as the tokenize stage checks them) and the variant
  has none yet: tokenize then keeps it instead of fitting the same RQ-VAE again. A variant
  that changes a tokenizer setting or the seed fits its own."""
  name = fit_lib.tokenizer_name(
    config,
    fit_lib.check_scheme(str(config.tokenizer.scheme)),
    pseudo_lib.check_protocol(str(config.protocol)),
  )
  have, want = paths.tokenizer_dir(source, name), paths.tokenizer_dir(target, name)
  if os.path.exists(want):
    return
  made = fingerprint.Output(have, tokenize.inputs(config, source), stage="", on_other="redo")
  if made.done():
    shutil.copytree(have, want)


def run_variant(
  config_spec: str,
  workdir: str,
  overrides: list[str],
  stage: str,
  seed: int,
  source: str = "",
) -> tuple:
  """Runs tokenize / train (/ rank) of one variant in `workdir` (reusing the voken table of the
  `source` workdir when it fits); -> its config."""
  config = config_lib.load_config(
    config_spec,
    [
      f"seed={seed}",
      f"loader.shuffle_seed={seed}",
      # No validation while training, not even after the last step: `hit_ranks` searches
      # every query of the chosen splits right after (the search a stage's own end-of-training
      # validation would repeat). Neutral keys (stage_inputs.NEUTRAL): a kept workdir stays
      # reusable.
      "train.eval_every=0",
      "rank.eval_every=0",
      *overrides,
    ],
  )
  if source:
    reuse_tokenizer(config, source, workdir)
  tokenize.run(config, workdir)
  train.run(config, workdir)
  if stage == "rank":
    rank.run(config, workdir)
  return config


def recall(ranks: np.ndarray, k: int) -> np.ndarray:
  return (ranks < k).astype(np.float64)


def paired(variant: np.ndarray, base: np.ndarray, k: int, rng) -> dict:
  """Mean difference of Recall@k (in points) and its 95 % bootstrap interval over queries.
  `variant [seeds, Q]`, `base [seeds, Q]` (each averaged over its seeds first)."""
  diff = recall(variant, k).mean(axis=0) - recall(base, k).mean(axis=0)
  idx = rng.integers(0, diff.shape[0], (BOOTSTRAP, diff.shape[0]))
  boot = diff[idx].mean(axis=1)
  return {
    "diff": 100 * diff.mean(),
    "ci95": [100 * np.percentile(boot, 2.5), 100 * np.percentile(boot, 97.5)],
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a workdir with prepare + embed done")
  parser.add_argument("--config", default="configs/smoke.py")
  parser.add_argument("--out", required=True)
  parser.add_argument("--variant", action="append", required=True)
  parser.add_argument("--baseline", default="", help="variant name (default: the first)")
  parser.add_argument(
    "--stage", choices=("train", "rank"), default="train", help="evaluate after this stage"
  )
  parser.add_argument("--splits", default="val")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--keep", default="", help="keep (and reuse) variant workdirs here")
  args = parser.parse_args(argv)
  variants = [parse_variant(v) for v in args.variant]
  names = [n for n, _ in variants]
  if len(set(names)) != len(names):
    raise UserError("--variant names must be distinct")
  baseline = args.baseline or names[0]
  if baseline not in names:
    raise UserError(f"--baseline {baseline!r} is not a --variant")
  seeds = [int(s) for s in args.seeds.split(",")]
  splits = [s for s in args.splits.split(",") if s]
  for name in ("prepared", "embed"):
    if not os.path.isdir(os.path.join(args.workdir, name)):
      raise UserError(f"{args.workdir}: no {name}/ (run `avg-jax prepare` and `embed` first)")

  scratch = args.keep or tempfile.mkdtemp(prefix="variants-")
  trained: dict = {}  # (training key of the evaluated stage, seed) -> workdir
  generators: dict = {}  # (training key of the train stage, seed) -> workdir
  ranks = {}
  try:
    for name, overrides in variants:
      per_seed = {s: {"image": [], "code": []} for s in splits}
      start = time.time()
      for seed in seeds:
        key = (training_key(overrides, args.stage), seed)
        workdir = trained.get(key) or os.path.join(scratch, f"{name}-{seed}")
        if key not in trained and not os.path.isdir(os.path.join(workdir, "prepared")):
          make_copy(args.workdir, workdir)
          train_key = (training_key(overrides, "train"), seed)
          if train_key in generators:
            seed_from(generators[train_key], workdir)
        trained[key] = workdir
        generators.setdefault((training_key(overrides, "train"), seed), workdir)
        config = run_variant(args.config, workdir, overrides, args.stage, seed, args.workdir)
        found = hit_ranks(config, workdir, args.stage, splits)
        for s in splits:
          for kind in ("image", "code"):
            per_seed[s][kind].append(found[s][kind])
      ranks[name] = {s: {kind: np.stack(v) for kind, v in per_seed[s].items()} for s in splits}
      ranks[name]["seconds_per_seed"] = (time.time() - start) / len(seeds)
  finally:
    if not args.keep:
      shutil.rmtree(scratch, ignore_errors=True)

  rng = np.random.default_rng(0)
  rows = []
  for name, overrides in variants:
    row = {
      "variant": name,
      "overrides": overrides,
      "seeds": seeds,
      "seconds_per_seed": ranks[name]["seconds_per_seed"],
    }
    for s in splits:
      r = ranks[name][s]
      row[s] = {f"R@{k}": 100 * recall(r["image"], k).mean() for k in KS}
      row[s].update({f"code R@{k}": 100 * recall(r["code"], k).mean() for k in KS})
      row[s]["per_seed_R@1"] = [100 * recall(x, 1).mean() for x in r["image"]]
      if name != baseline:
        base = ranks[baseline][s]
        row[s]["vs_baseline"] = {f"R@{k}": paired(r["image"], base["image"], k, rng) for k in KS}
    rows.append(row)

  header = (
    f"{'variant':<14} "
    + " ".join(f"{s + ' R@' + str(k):>24}" for s in splits for k in (1, 5))
    + "  code R@1"
  )
  print(f"baseline: {baseline}; stage: {args.stage}; seeds: {seeds}")
  print(header)
  for row in rows:
    cells = []
    for s in splits:
      for k in (1, 5):
        value = row[s][f"R@{k}"]
        if "vs_baseline" in row[s]:
          d = row[s]["vs_baseline"][f"R@{k}"]
          cells.append(f"{value:5.1f} {d['diff']:+5.1f} [{d['ci95'][0]:+.1f},{d['ci95'][1]:+.1f}]")
        else:
          cells.append(f"{value:5.1f}")
    code = " ".join(f"{row[s]['code R@1']:5.1f}" for s in splits)
    print(f"{row['variant']:<14} " + " ".join(f"{c:>24}" for c in cells) + f"  {code}")
  result = {
    "bench": "variants",
    "workdir": os.path.abspath(args.workdir),
    "stage": args.stage,
    "config": args.config,
    "baseline": baseline,
    "bootstrap": BOOTSTRAP,
    "machine": common.machine_info(" ".join([sys.executable] + sys.argv)),
    "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + ".tmp", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  os.replace(args.out + ".tmp", args.out)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except UserError as e:
    print(f"variants: error: {e}", file=sys.stderr)
    sys.exit(2)
