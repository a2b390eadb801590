"""How `prepare` and `embed` grow with the data: both stages on N generated Karpathy images.

For each N a Karpathy-format dataset of N small generated photos (5 captions each; 90 %
train, 5 % val, 5 % test; avg_jax/bench/paper_world.py) is written, then `avg-jax prepare` and
`avg-jax embed` run as measured subprocesses (avg_jax/bench/stage_runs.py): wall time, CPU
time and peak RSS of each, process 0's serial steps in prepare (`build_seconds`: assembling
the shards, pseudo queries, the text tokenizer, the statistics pass that reads every record;
from its metrics records)
and embed's extraction seconds (the encoder's training, a fixed number of steps, is the rest).
"""

import os
import shutil
import time
from collections.abc import Sequence
from typing import Any

from avg_jax.bench import dry_run, paper_world, stage_runs


def splits_of(n: int) -> tuple[int, int, int]:
  """(train, val, test) image counts: 5 % each for val and test (at least 1)."""
  held = max(1, n // 20)
  if n - 2 * held < 1:
    raise ValueError(f"need at least 3 images, got {n}")
  return n - 2 * held, held, held


def run_size(
  n: int,
  root: str,
  config: str,
  overrides: Sequence[str],
  photo_size: tuple[int, int],
  render_size: int,
  keep: bool = False,
) -> dict:
  """Generates N images under `<root>/n<N>` and measures prepare and embed on them."""
  base = os.path.join(root, f"n{n}")
  shutil.rmtree(base, ignore_errors=True)
  paths = paper_world.world_paths(os.path.join(base, "data"), "flickr30k")
  os.makedirs(paths["image_root"])
  size = paper_world.WorldSize(images=splits_of(n), photo_size=photo_size, render_size=render_size)
  start = time.perf_counter()
  paper_world.write_karpathy(
    paths["karpathy_json"], paths["image_root"], paths["pseudo_queries"], size
  )
  generate_s = time.perf_counter() - start
  workdir = os.path.join(base, "workdir")
  args = [
    f"data.karpathy_json={paths['karpathy_json']}",
    f"data.image_root={paths['image_root']}",
    f"data.pseudo_queries={paths['pseudo_queries']}",
    *overrides,
  ]
  row: dict[str, Any] = {
    "images": n,
    "splits": list(size.images),
    "generate_s": round(generate_s, 2),
  }
  for stage in ("prepare", "embed"):
    run = stage_runs.run_stage(stage, config, workdir, args, os.path.join(base, "logs"))
    row[stage] = {
      "wall_s": run.wall_s,
      "cpu_s": round(run.user_s + run.sys_s, 2),
      "peak_rss_mib": run.peak_rss_mib,
    }
    if stage == "prepare":
      row[stage]["build_seconds"] = dry_run.build_seconds(run.records)
    if stage == "embed":
      # One record per split, each carrying the same total of the whole extraction.
      row[stage]["extraction_s"] = round(
        max(r["seconds"] for r in run.records if "seconds" in r), 2
      )
  if not keep:
    shutil.rmtree(base, ignore_errors=True)
  return row


def table(rows: Sequence[dict]) -> str:
  head = [
    "images",
    "prepare s",
    "prepare RSS MiB",
    "statistics s",
    "tokenizer s",
    "assemble s",
    "embed s",
    "extraction s",
    "embed RSS MiB",
  ]
  lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
  for r in rows:
    p, e, b = r["prepare"], r["embed"], r["prepare"]["build_seconds"]
    lines.append(
      " | ".join(
        str(x)
        for x in (
          f"{r['images']:,}",
          p["wall_s"],
          p["peak_rss_mib"],
          b["statistics"],
          b["text_tokenizer"],
          b["assemble"],
          e["wall_s"],
          e["extraction_s"],
          e["peak_rss_mib"],
        )
      )
    )
  return "\n".join(lines)
