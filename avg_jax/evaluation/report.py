"""Turns evaluation results into `report.md` with PNG plots and a one-screen summary.

`results` is the record the evaluate stage writes to `metrics.json`
(`avg_jax.artifacts.results.Results`; its module docstring describes the file).
"""

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from avg_jax.artifacts import io  # noqa: E402
from avg_jax.artifacts.results import (  # noqa: E402
  AnnPoint,
  CodebookUsage,
  HybridChoice,
  MethodResult,
  PairedDifference,
  Results,
  SpeedRow,
)
from avg_jax.metrics import NOT_APPLICABLE, format_metric  # noqa: E402

RECALL_KEYS = ("R@1", "R@5", "R@10")
CODE_KEYS = ("code R@1", "code R@5", "code R@10")


def crossover(avg: Sequence[SpeedRow], two_tower: Sequence[SpeedRow]) -> float | None:
  """Smallest N from which AVG's queries/s stays at or above two-tower's at every larger size
  measured (log-log interpolation at the last crossing), as "AVG faster from N ~" says.

  Only sizes measured for both count.
  Returns None when AVG is slower at the largest size, the first size when it never is slower.
  (AVG faster at 100 but slower at 1,000 is not "faster from 100": the last crossing counts.)
  """
  a = {int(r.num_items): float(r.queries_per_s) for r in avg}
  t = {int(r.num_items): float(r.queries_per_s) for r in two_tower}
  sizes = sorted(set(a) & set(t))
  if not sizes:
    return None
  ratio = [math.log(a[n]) - math.log(t[n]) for n in sizes]  # > 0: AVG faster
  slower = [i for i, r in enumerate(ratio) if r < 0]
  if not slower:
    return float(sizes[0])
  last = slower[-1]
  if last == len(sizes) - 1:
    return None
  (n0, r0), (n1, r1) = (sizes[last], ratio[last]), (sizes[last + 1], ratio[last + 1])
  frac = -r0 / (r1 - r0)
  return float(math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))))


def plot_recall(recall: dict[str, dict[str, MethodResult]], path: str) -> None:
  """Image-level Recall@K bars per method, one panel per protocol."""
  protocols = list(recall)
  fig, axes = plt.subplots(
    1,
    len(protocols),
    squeeze=False,
    figsize=(max(5, 1.1 * max(len(m) for m in recall.values())) * len(protocols), 3.5),
  )
  width = 0.8 / len(RECALL_KEYS)
  for ax, protocol in zip(axes[0], protocols):
    methods = list(recall[protocol])
    for i, key in enumerate(RECALL_KEYS):
      xs = [j + (i - 1) * width for j in range(len(methods))]
      ax.bar(xs, [recall[protocol][m].recall.get(key, 0.0) for m in methods], width, label=key)
    ax.set_xticks(range(len(methods)), methods, rotation=30)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{protocol}: text-to-image Recall@K (test)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_efficiency(
  efficiency: Mapping[str, Sequence[SpeedRow]], path: str, cross: float | None
) -> None:
  fig, ax = plt.subplots(figsize=(5, 3.5))
  xs: list[float] = []
  ys: list[float] = []
  for method, rows in efficiency.items():
    rows = sorted(rows, key=lambda r: r.num_items)
    x, y = [r.num_items for r in rows], [r.queries_per_s for r in rows]
    ax.plot(x, y, "o-", label=method)
    xs += x
    ys += y
  if cross is not None:
    ax.axvline(cross, color="grey", ls="--", lw=1, label=f"crossover ~{cross:,.0f}")
    xs.append(cross)
  # One N (or one speed) spans no range: matplotlib would warn and widen it itself.
  if xs and min(xs) == max(xs) > 0:
    ax.set_xlim(xs[0] / 2, xs[0] * 2)
  if ys and min(ys) == max(ys) > 0:
    ax.set_ylim(ys[0] / 2, ys[0] * 2)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("indexed images N")
  ax.set_ylabel("queries / s")
  ax.set_title("Retrieval speed vs index size")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_ann_frontier(
  frontier: Sequence[AnnPoint], efficiency: Mapping[str, Sequence[SpeedRow]], path: str
) -> None:
  """Recall@k against exact search vs queries/s of the HNSW two-tower, one line per N (its
  points: the ef_search values), with AVG's queries/s at each N as vertical marks."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  sizes = sorted({r.num_items for r in frontier})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, n in enumerate(sizes):
    rows = sorted((r for r in frontier if r.num_items == n), key=lambda r: r.ef_search)
    color = colors[i % len(colors)]
    ax.plot(
      [r.queries_per_s for r in rows],
      [r.recall_at_k for r in rows],
      "o-",
      color=color,
      label=f"HNSW N={n:,}",
    )
    for method, style in (("avg", ":"), ("avg_hybrid", "--")):
      q = [r.queries_per_s for r in efficiency.get(method, ()) if r.num_items == n]
      if q:
        ax.axvline(q[0], color=color, ls=style, lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("queries / s (text encoding included)")
  ax.set_ylabel(f"recall@{frontier[0].k} vs exact search")
  ax.set_title("Two-tower HNSW frontier (dotted: AVG, dashed: avg_hybrid)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _markdown_frontier(frontier: Sequence[AnnPoint]) -> list[str]:
  out = [
    "| N | ef_search | queries/s | search-only q/s | recall@k vs exact | build s | index MB |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in sorted(frontier, key=lambda r: (r.num_items, r.ef_search)):
    out.append(
      f"| {r.num_items:,} | {r.ef_search} | {r.queries_per_s:.1f} | "
      f"{r.search_only_queries_per_s:.1f} | {r.recall_at_k:.3f} | "
      f"{r.build_s:.1f} | {r.index_bytes / 2**20:.1f} |"
    )
  return out + [""]


def plot_codebook(codebook: dict[str, CodebookUsage], path: str) -> None:
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  for scheme, usage in codebook.items():
    levels = range(1, len(usage.perplexity) + 1)
    axes[0].plot(levels, usage.perplexity, "o-", label=scheme)
    axes[1].plot(levels, [100 * u for u in usage.unused_share], "o-", label=scheme)
  axes[0].set_title("codebook perplexity per level")
  axes[1].set_title("unused codes per level (%)")
  for ax in axes:
    ax.set_xlabel("level")
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_collisions(collisions: dict, path: str) -> None:
  schemes = list(collisions)
  splits = sorted({s for v in collisions.values() for s in v})
  fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(schemes)), 3.2))
  width = 0.8 / max(len(splits), 1)
  for i, split in enumerate(splits):
    xs = [j + (i - (len(splits) - 1) / 2) * width for j in range(len(schemes))]
    ax.bar(xs, [100 * collisions[s].get(split, 0.0) for s in schemes], width, label=split)
  ax.set_xticks(range(len(schemes)), schemes)
  ax.set_ylabel("images sharing their L-voken code (%)")
  ax.set_title("Collision rate before disambiguation")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def summary_table(results: Results) -> str:
  """A plain-text table of Recall@K per method plus the efficiency crossover (each part only
  when `results` has it)."""
  lines: list[str] = []
  for protocol, methods in results.methods.items():
    seen = [
      f"{m}{_count(r.saw_pseudo_queries)}" for m, r in methods.items() if r.saw_pseudo_queries
    ]
    if lines:
      lines.append("")
    none = "none" + (
      " (the data has none: the same training as inductive)" if protocol == "transductive" else ""
    )
    lines.append(
      f"protocol {protocol} (test; trained on the indexed images' pseudo queries: "
      f"{', '.join(seen) or none})"
    )
    lines.append(
      f"{'method':<12}"
      + "".join(f"{k:>8}" for k in RECALL_KEYS)
      + "".join(f"{k:>11}" for k in CODE_KEYS)
      + "   R@1 vs two-tower [95% CI]"
    )
    for method, m in methods.items():
      # A metric a method does not have (code R@K of two_tower) shows a dash, never nan.
      cells = [f"{format_metric(m.recall.get(k), '.1f'):>11}" for k in CODE_KEYS]
      d = (m.vs_two_tower or {}).get("R@1")
      if d is not None:
        cells.append(f"   {_difference(d)}")
      lines.append(
        f"{method:<12}"
        + "".join(f"{format_metric(m.recall.get(k), '.1f'):>8}" for k in RECALL_KEYS)
        + "".join(cells)
      )
  eff = results.efficiency
  if eff:
    if lines:
      lines.append("")
    # Columns wide enough for the longest method name (two_tower_hnsw), one space apart.
    width = max(16, max(len(m) for m in eff) + 6)
    lines.append(f"{'N':>10}" + "".join(f"{m + ' q/s':>{width}}" for m in eff))
    sizes = sorted({int(r.num_items) for rows in eff.values() for r in rows})
    for n in sizes:
      cells = []
      for rows in eff.values():
        q = [r.queries_per_s for r in rows if int(r.num_items) == n]
        cells.append(f"{format_metric(q[0] if q else None, '.1f'):>{width}}")
      lines.append(f"{n:>10,}" + "".join(cells))
    cross = results.crossover
    lines.append(
      "AVG faster than two-tower from N ~ "
      + (f"{cross:,.0f}" if cross else "never (within the sizes measured)")
    )
  return "\n".join(lines)


def _count(value) -> str:
  """ " (817)" for a count of pseudo queries; "" for the booleans of older results."""
  return "" if isinstance(value, bool) else f" ({int(value)})"


def _difference(d: PairedDifference) -> str:
  """A paired difference to the two-tower as "+1.2 [-0.3, +2.8]"."""
  return f"{d.diff:+.1f} [{d.ci95[0]:+.1f}, {d.ci95[1]:+.1f}]"


def _markdown_recall(recall: dict[str, dict[str, MethodResult]]) -> list[str]:
  keys = RECALL_KEYS + CODE_KEYS
  out = []
  for protocol, methods in recall.items():
    out += [
      f"### {protocol}",
      "",
      "| method | saw pseudo queries | " + " | ".join(keys) + " | R@1 vs two-tower |",
      "|---" * (len(keys) + 3) + "|",
    ]
    for method, m in methods.items():
      count = m.saw_pseudo_queries
      saw = f"yes{_count(count)}" if count else "no"
      d = (m.vs_two_tower or {}).get("R@1")
      vs = _difference(d) if d is not None else NOT_APPLICABLE
      out.append(
        f"| {method} | {saw} | "
        + " | ".join(format_metric(m.recall.get(k), ".1f") for k in keys)
        + f" | {vs} |"
      )
    out.append("")
  return out


def _markdown_hybrid(hybrid: dict[str, HybridChoice]) -> list[str]:
  """avg_hybrid's weight per protocol and the validation Recall@K of every weight tried."""
  out = [
    "## avg_hybrid: fusion weight chosen on validation",
    "",
    "score = generative log-prob + weight x dual-encoder cosine over avg_ltr's beam; the "
    "weight with the best validation R@1 is used on test.",
    "",
  ]
  for protocol, h in hybrid.items():
    out += [
      f"### {protocol} (chosen: {h.weight:g})",
      "",
      "| weight | " + " | ".join(RECALL_KEYS) + " |",
      "|---" * (len(RECALL_KEYS) + 1) + "|",
    ]
    out += [
      f"| {t.weight:g} | " + " | ".join(f"{t.recall[k]:.1f}" for k in RECALL_KEYS) + " |"
      for t in h.validation
    ]
    out.append("")
  return out


def _percent(share) -> str:
  """A share as a percentage cell; NOT_APPLICABLE when missing or NaN."""
  cell = format_metric(share)
  return cell if cell == NOT_APPLICABLE else f"{100 * share:.1f}%"


def write_report(results: Results, directory: str) -> str:
  """Writes `report.md` and its PNG plots into `directory`; returns the report path."""
  os.makedirs(directory, exist_ok=True)
  md = ["# avg-jax evaluation report", ""]
  if results.meta is not None:
    meta = dataclasses.asdict(results.meta)
    md += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in meta.items()] + [""]
  if results.methods:
    plot_recall(results.methods, os.path.join(directory, "recall.png"))
    md += [
      "## Recall@K (Karpathy protocol, test split, %)",
      "",
      "Image level (R@K: the query's image is retrieved) and the paper's code level "
      "(code R@K: a generated code sequence equals the image's semantic codes).",
      "",
    ]
    md += _markdown_recall(results.methods)
    md += ["![recall](recall.png)", ""]
  if results.hybrid:
    md += _markdown_hybrid(results.hybrid)
  if results.efficiency:
    plot_efficiency(
      results.efficiency, os.path.join(directory, "efficiency.png"), results.crossover
    )
    md += [
      "## Efficiency: queries/s vs number of indexed images",
      "",
      "```",
      summary_table(Results(efficiency=results.efficiency, crossover=results.crossover)),
      "```",
      "",
      "![efficiency](efficiency.png)",
      "",
    ]
  if results.ann_frontier:
    plot_ann_frontier(
      results.ann_frontier, results.efficiency, os.path.join(directory, "ann_frontier.png")
    )
    md += [
      "## Two-tower with an approximate index (faiss HNSW)",
      "",
      "The efficiency table's `two_tower_hnsw` row is, per N, the fastest ef_search whose "
      "recall against exact search reaches the target (evaluate.ann_target_recall).",
      "",
    ]
    md += _markdown_frontier(results.ann_frontier)
    md += ["![ann frontier](ann_frontier.png)", ""]
  if results.codebook:
    plot_codebook(results.codebook, os.path.join(directory, "codebook.png"))
    md += ["## Codebook usage", "", "![codebook](codebook.png)", ""]
  if results.collisions:
    plot_collisions(results.collisions, os.path.join(directory, "collisions.png"))
    md += [
      "## Collision rate before disambiguation",
      "",
      "| scheme | "
      + " | ".join(sorted({s for v in results.collisions.values() for s in v}))
      + " |",
    ]
    splits = sorted({s for v in results.collisions.values() for s in v})
    md += ["|---" * (len(splits) + 1) + "|"]
    for scheme, rates in results.collisions.items():
      # A split this scheme has no table for is a dash, not a 0.0% collision rate.
      md.append(f"| {scheme} | " + " | ".join(_percent(rates.get(s)) for s in splits) + " |")
    md += ["", "![collisions](collisions.png)", ""]
  path = os.path.join(directory, "report.md")
  io.write_text(path, "\n".join(md) + "\n")
  return path
