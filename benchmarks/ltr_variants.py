"""Does learning to rank help? Rank-stage variants against the generator they start from.

For a workdir whose `train` stage finished, each variant (config overrides of the rank stage)
is run once per seed (`loader.shuffle_seed`: the order of the training queries) in a scratch
copy of the workdir; the resulting parameters and the generator's own are evaluated on every
caption of the val and test splits with the constrained search, as `avg-jax evaluate` does.
Differences to the generator are paired per query, with a 95 % bootstrap interval over
queries (seeds averaged first). Prints a table and writes a JSON file.

    python benchmarks/ltr_variants.py --workdir runs/smoke --out benchmarks/results/ltr.json \\
        --variant default= --variant "w0=rank.rank_weight=0.0" --seeds 0,1,2

A variant is `name=override[,override...]` (an empty list keeps the config's rank settings).
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
from avg_jax import paths  # noqa: E402
from avg_jax.bench import common  # noqa: E402
from avg_jax.errors import UserError  # noqa: E402
from avg_jax.evaluation import avg_eval  # noqa: E402
from avg_jax.training import generative, ltr  # noqa: E402

SPLITS = ("val", "test")
KS = (1, 5, 10)
BOOTSTRAP = 4000


def parse_variant(text: str) -> tuple[str, list[str]]:
  """`name=o1,o2` -> (name, [o1, o2]); overrides may not contain commas."""
  name, sep, rest = text.partition("=")
  if not sep or not name:
    raise UserError(f"--variant {text!r}: expected name=override[,override...]")
  return name, [o for o in rest.split(",") if o]


def hit_ranks(config, workdir: str, stage: str) -> dict:
  """`{split: int[Q]}`: rank of the true image among the returned ids (10 if absent)."""
  scheme = config.tokenizer.scheme
  gen, mesh, params, shardings = generative.final_params(config, workdir, scheme, stage)
  out = {}
  for split in SPLITS:
    m = avg_eval.evaluate_recall(gen, params, shardings, mesh, config, workdir, split)
    found = m["_results"]["item_ids"] == m["_true_ids"][:, None]           # [Q, k]
    k = found.shape[1]
    out[split] = np.where(found.any(axis=1), found.argmax(axis=1), k)
  return out


def scratch_copy(workdir: str, scratch: str) -> str:
  """A copy of `workdir` without its rank, evaluate and export outputs (the copy's rank
  stage starts from the finished generator)."""
  skip = {os.path.basename(os.path.dirname(paths.rank_dir(workdir, "x"))),
          os.path.basename(paths.evaluate_dir(workdir)), os.path.basename(paths.export_dir(workdir))}
  target = os.path.join(scratch, "w")
  top = os.path.abspath(workdir)
  shutil.copytree(workdir, target, ignore=lambda d, names: [
      n for n in names if os.path.abspath(d) == top and n in skip])
  return target


def recall(ranks: np.ndarray, k: int) -> np.ndarray:
  return (ranks < k).astype(np.float64)


def paired(variant: np.ndarray, base: np.ndarray, k: int, rng) -> dict:
  """Mean difference of Recall@k (in points) and its 95 % bootstrap interval over queries.
  `variant [seeds, Q]`, `base [Q]`."""
  diff = recall(variant, k).mean(axis=0) - recall(base, k)
  idx = rng.integers(0, diff.shape[0], (BOOTSTRAP, diff.shape[0]))
  boot = diff[idx].mean(axis=1)
  return {"diff": 100 * diff.mean(), "ci95": [100 * np.percentile(boot, 2.5),
                                               100 * np.percentile(boot, 97.5)]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/smoke.py")
  parser.add_argument("--out", required=True)
  parser.add_argument("--variant", action="append", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  args = parser.parse_args(argv)
  variants = [parse_variant(v) for v in args.variant]
  seeds = [int(s) for s in args.seeds.split(",")]
  config = config_lib.load_config(args.config, ["train.eval_max_queries=0"])
  scheme = config.tokenizer.scheme
  if not os.path.isdir(generative.params_dir(args.workdir, scheme, "train")):
    raise UserError(f"{args.workdir}: the train stage has not finished")

  rng = np.random.default_rng(0)
  base = hit_ranks(config, args.workdir, "train")
  rows = [{"variant": "generator", "overrides": [], "seeds": [],
           **{s: {f"R@{k}": 100 * recall(base[s], k).mean() for k in KS} for s in SPLITS}}]
  for name, overrides in variants:
    per_seed = {s: [] for s in SPLITS}
    start = time.time()
    for seed in seeds:
      with tempfile.TemporaryDirectory(prefix="ltr-") as scratch:
        workdir = scratch_copy(args.workdir, scratch)
        run_config = config_lib.load_config(
            args.config, ["train.eval_max_queries=0", f"loader.shuffle_seed={seed}",
                          f"rank.eval_every={10**9}", *overrides])
        ltr.rank_generator(run_config, workdir, scheme)
        ranks = hit_ranks(run_config, workdir, "rank")
      for s in SPLITS:
        per_seed[s].append(ranks[s])
    row = {"variant": name, "overrides": overrides, "seeds": seeds,
           "seconds_per_seed": (time.time() - start) / len(seeds)}
    for s in SPLITS:
      stacked = np.stack(per_seed[s])
      row[s] = {f"R@{k}": 100 * recall(stacked, k).mean() for k in KS}
      row[s]["per_seed_R@1"] = [100 * recall(r, 1).mean() for r in per_seed[s]]
      row[s]["vs_generator"] = {f"R@{k}": paired(stacked, base[s], k, rng) for k in KS}
    rows.append(row)

  print(f"{'variant':<12} {'seeds':>5} " + " ".join(
      f"{s + ' R@' + str(k):>22}" for s in SPLITS for k in (1, 5)))
  for row in rows:
    cells = []
    for s in SPLITS:
      for k in (1, 5):
        value = row[s][f"R@{k}"]
        if "vs_generator" in row[s]:
          d = row[s]["vs_generator"][f"R@{k}"]
          cells.append(f"{value:5.1f} {d['diff']:+5.1f} [{d['ci95'][0]:+.1f},{d['ci95'][1]:+.1f}]")
        else:
          cells.append(f"{value:5.1f}")
    print(f"{row['variant']:<12} {len(row['seeds']):>5} " + " ".join(f"{c:>22}" for c in cells))
  result = {"bench": "ltr_variants", "workdir": os.path.abspath(args.workdir),
            "config": args.config, "bootstrap": BOOTSTRAP,
            "machine": common.machine_info(" ".join([sys.executable] + sys.argv)), "rows": rows}
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
    print(f"ltr_variants: error: {e}", file=sys.stderr)
    sys.exit(2)
