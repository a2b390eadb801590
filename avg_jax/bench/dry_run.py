"""The paper configs through every stage at their real shapes, on this CPU, before a TPU run.

`dry_run` writes a fake paper world (avg_jax/bench/paper_world.py) at the config's own model
shapes, then runs each stage as `avg-jax STAGE --config <paper config> --workdir W` with
the overrides README's TPU section gives (the five input paths) plus only:
  * step counts: tokenizer.steps, train.steps, rank.steps (a handful);
  * log_every 1 (tokenizer, train), so that steady step rates are logged;
  * batch sizes larger than the world's training captions, lowered to that count (the image
    tokenizer refuses a batch larger than its data);
  * the feature-extraction batch lowered to the smallest split's image count: every call
    computes a full `encoder_train.embed_batch_size` rows (one compiled shape), so the 256 of
    the paper config would run a 32-image split as 256 ViT-L/14-336 images (measured: more
    than 16 CPU-minutes for one such call on the dev box);
and, at `size="tiny"` only (the test suite's), tiny model shapes with data.image_size and
tokenizer.e_dim to match, and a shorter evaluation (`TINY_OVERRIDES`). Each stage's wall
time, CPU time, peak RSS and throughput are measured (avg_jax/bench/stage_runs.py) and
extrapolated to a full paper epoch on this machine, next to what `avg-jax compile` predicted
for TPU slices (the AOT reports in benchmarks/results/, when given).
"""

import json
import os
from collections.abc import Sequence
from typing import Any

from avg_jax import config as config_lib
from avg_jax.bench import common, paper_world, stage_runs

# One epoch of the paper's data (Karpathy splits; pseudo queries: 5 per test image).
EPOCHS = {
  "flickr30k": dict(images=31_014, train_pairs=145_000 + 5_000, test_queries=5_000),
  "coco": dict(images=123_287, train_pairs=566_000 + 25_000, test_queries=25_000),
}
ENCODER_SHAPE_KEYS = (
  "image_size",
  "patch_size",
  "vision_width",
  "vision_layers",
  "vision_heads",
  "vision_mlp_dim",
  "text_width",
  "text_layers",
  "text_heads",
  "text_mlp_dim",
  "projection_dim",
  "max_text_length",
)
T5_SHAPE_KEYS = ("d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers", "num_decoder_layers")
DEFAULT_STEPS = {"tokenizer.steps": 5, "train.steps": 5, "rank.steps": 4}
# The test suite's size: one protocol, small batches and a short evaluation (seconds).
TINY_STEPS = {"tokenizer.steps": 3, "train.steps": 3, "rank.steps": 3}
TINY_OVERRIDES = [
  "evaluate.methods=('two_tower', 'avg', 'avg_ltr')",
  "evaluate.protocols=('transductive',)",
  "evaluate.ablation_protocols=('transductive',)",
  "evaluate.efficiency_sizes=(100,)",
  "evaluate.efficiency_queries=4",
  "evaluate.ann_ef_search=(16,)",
  "train.eval_every=0",
  "rank.eval_every=0",
  "train.batch_size=16",
  "rank.batch_size=8",
  "decode.batch_size=16",
]
# `avg-jax compile` step name -> the stage whose throughput it predicts.
AOT_STAGE = {"tokenizer": "tokenize", "train": "train", "rank": "rank", "search": "evaluate"}
_EPOCH_OF = {
  "prepare": "images",
  "embed": "images",
  "tokenize": "train_pairs",
  "train": "train_pairs",
  "rank": "train_pairs",
  "evaluate": "test_queries",
}


def dataset_of(config_spec: str) -> str:
  """ "coco" for configs/coco.py[:arg], else "flickr30k"."""
  name = os.path.basename(config_spec.partition(":")[0])
  return "coco" if name.startswith("coco") else "flickr30k"


def shapes(config: Any, size: str) -> tuple[dict, dict]:
  """(CLIP shape, T5 shape) of the world: the config's own, or the tiny ones."""
  if size == "tiny":
    return dict(paper_world.TINY_CLIP), dict(paper_world.TINY_T5)
  return (
    {k: config.encoder[k] for k in ENCODER_SHAPE_KEYS},
    {k: config.t5[k] for k in T5_SHAPE_KEYS},
  )


def overrides(
  config: Any, world: dict, world_size: paper_world.WorldSize, size: str, steps: dict[str, int]
) -> tuple[list[str], list[str]]:
  """(the README's input-path overrides, the dry run's other overrides)."""
  paths = [
    f"data.karpathy_json={world['karpathy_json']}",
    f"data.image_root={world['image_root']}",
    f"encoder.pretrained_path={world['clip']}",
    f"t5.pretrained_path={world['t5']}",
    f"data.pseudo_queries={world['pseudo_queries']}",
  ]
  extra = [f"{k}={v}" for k, v in steps.items()]
  extra += ["tokenizer.log_every=1", "train.log_every=1"]
  captions = world_size.images[0] * paper_world.CAPTIONS_PER_IMAGE
  for key in ("tokenizer.batch_size", "train.batch_size", "rank.batch_size"):
    if config_lib.get(config, key) > captions:
      extra.append(f"{key}={captions}")
  smallest = min(world_size.images)
  if config_lib.get(config, "encoder_train.embed_batch_size") > smallest:
    extra.append(f"encoder_train.embed_batch_size={smallest}")
  if size == "tiny":
    clip, t5 = shapes(config, size)
    extra += [
      f"data.image_size={clip['image_size']}",
      f"tokenizer.e_dim={t5['d_model']}",
      *TINY_OVERRIDES,
    ]
  return paths, extra


def _aot_rows(report: dict) -> dict[str, dict]:
  """`{stage: {"flops", "step_s", "batch"}}` of an `avg-jax compile` report."""
  rows = {}
  for step in report.get("steps", []):
    stage = AOT_STAGE.get(step.get("step"))
    if stage and not step.get("error"):
      rows[stage] = {
        "flops": step.get("flops"),
        "step_s": step.get("t_assumed_s"),
        "batch": step.get("batch"),
      }
  return rows


def load_aot(files: Sequence[str]) -> dict[str, dict]:
  """`{slice name: _aot_rows}` of the AOT reports that exist among `files`."""
  out = {}
  for path in files:
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        report = json.load(f)
      out[f"{report['topology']} ({report['chips']} chips)"] = _aot_rows(report)
  return out


def build_seconds(prepare_records: Sequence[dict]) -> dict:
  """Process 0's serial steps in `prepare` (its metrics records), in seconds."""
  return next((r["build_seconds"] for r in prepare_records if "build_seconds" in r), {})


def _epoch_hours(stage: str, rate: float | None, epoch: dict) -> float | None:
  if not rate or stage not in _EPOCH_OF:
    return None
  return epoch[_EPOCH_OF[stage]] / rate / 3600


def dry_run(
  config_spec: str,
  root: str,
  *,
  size: str = "paper",
  world_size: paper_world.WorldSize | None = None,
  steps: dict[str, int] | None = None,
  extra: Sequence[str] = (),
  aot_files: Sequence[str] = (),
  env: dict | None = None,
) -> dict:
  """Writes the world under `<root>/world`, runs every stage in `<root>/workdir`; -> results."""
  config = config_lib.load_config(config_spec)
  dataset = dataset_of(config_spec)
  world_size = world_size or paper_world.WORLD_SIZES[size]
  clip, t5 = shapes(config, size)
  world = paper_world.make_world(
    os.path.join(root, "world"),
    world_size,
    clip,
    t5,
    t5_vocab=int(config.t5.vocab_size),
    style=dataset,
  )
  steps = steps or (TINY_STEPS if size == "tiny" else DEFAULT_STEPS)
  path_overrides, other = overrides(config, world, world_size, size, steps)
  other = other + list(extra)
  workdir = os.path.join(root, "workdir")
  runs = []
  for stage in stage_runs.STAGES:
    runs.append(
      stage_runs.run_stage(
        stage, config_spec, workdir, path_overrides + other, os.path.join(root, "logs"), env
      )
    )
    # As each stage ends: a run that fails later still shows what the earlier ones cost.
    print(
      f"dry run: {stage}: {runs[-1].wall_s:.1f} s wall, "
      f"{runs[-1].user_s + runs[-1].sys_s:.1f} s CPU, {runs[-1].peak_rss_mib:.0f} MiB peak",
      flush=True,
    )
  with open(os.path.join(workdir, "prepared", "dataset_info.json"), encoding="utf-8") as f:
    info = json.load(f)
  counts = {"images": sum(s["num_images"] for s in info["splits"].values())}
  aot = load_aot(aot_files)
  epoch = EPOCHS[dataset]
  rows = []
  for run in runs:
    t = stage_runs.throughput(run, counts)
    row = {
      "stage": run.stage,
      "wall_s": run.wall_s,
      "cpu_s": round(run.user_s + run.sys_s, 2),
      "peak_rss_mib": run.peak_rss_mib,
      "unit": t["unit"],
      "rate": t["rate"],
      "basis": t["basis"],
      "epoch_hours_here": _epoch_hours(run.stage, t["rate"], epoch),
    }
    for name, table in aot.items():
      if run.stage in table:
        a = table[run.stage]
        tpu_rate = a["batch"] / a["step_s"] if a["step_s"] else None
        row.setdefault("aot", {})[name] = {
          **a,
          "epoch_hours": _epoch_hours(run.stage, tpu_rate, epoch),
        }
    rows.append(row)
  return {
    "config": config_spec,
    "dataset": dataset,
    "size": size,
    "world": {
      "images": list(world_size.images),
      "photo_size": list(world_size.photo_size),
      "clip": clip,
      "t5": t5,
      "clip_vocab": world_size.clip_vocab,
      "t5_pieces": world_size.t5_pieces,
      "t5_vocab": int(config.t5.vocab_size),
    },
    "input_overrides": path_overrides,
    "dry_run_overrides": other,
    "prepare_build_seconds": build_seconds(runs[0].records),
    "epoch": epoch,
    "stages": rows,
    "total_wall_s": round(sum(r.wall_s for r in runs), 1),
    "machine": common.machine_info(command=""),
  }


def _fmt(value: float | None, digits: int = 1) -> str:
  return "-" if value is None else f"{value:,.{digits}f}"


def table(results: dict) -> str:
  """The per-stage table (plain text)."""
  slices = sorted({name for r in results["stages"] for name in r.get("aot", {})})
  head = ["stage", "wall s", "CPU s", "peak RSS MiB", "throughput", "epoch here (h)"]
  for name in slices:
    head += [f"{name}: GFLOP/step", "step s", "epoch (h)"]
  lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
  for r in results["stages"]:
    cells = [
      r["stage"],
      _fmt(r["wall_s"]),
      _fmt(r["cpu_s"]),
      _fmt(r["peak_rss_mib"], 0),
      f"{_fmt(r['rate'], 2)} {r['unit']}".strip(),
      _fmt(r["epoch_hours_here"], 2),
    ]
    for name in slices:
      a = r.get("aot", {}).get(name)
      cells += (
        [
          _fmt(a["flops"] / 1e9, 1) if a["flops"] else "-",
          _fmt(a["step_s"], 4),
          _fmt(a["epoch_hours"], 3),
        ]
        if a
        else ["-", "-", "-"]
      )
    lines.append(" | ".join(cells))
  build = results.get("prepare_build_seconds") or {}
  if build:
    lines.append(
      "prepare, process 0's serial steps (s): " + ", ".join(f"{k} {v}" for k, v in build.items())
    )
  return "\n".join(lines)
