"""Compiling a `Program` for a topology and reading per-device memory and FLOPs from XLA.

Numbers come from the compiled executable: `memory_analysis()` (bytes of arguments,
temporaries, outputs and donated aliases on one device) and `cost_analysis()` (FLOPs and bytes
accessed of the per-device SPMD program). Derived figures, per step:

  total bytes     = arguments + outputs - aliased (donated) + temporaries, vs the chip's HBM
  t@100%          = FLOPs per device / peak FLOP/s          (compute-bound time)
  t_roofline      = max(t@100%, bytes accessed / HBM bandwidth)
  t_assumed       = t_roofline / roofline_efficiency        (the stated assumption)
  MFU estimate    = t@100% / t_assumed = FLOPs / (chips x peak x t_assumed) summed over chips

XLA counts FLOPs it executes (rematerialised forward passes included), so this is hardware
FLOPs utilisation; it counts a while-loop body once, which `Program.loop_body` corrects.
A program that does not fit fails to compile with RESOURCE_EXHAUSTED: the report keeps the
compiler's one-line reason instead of numbers.
"""

import dataclasses
import re
import time
from typing import Any

from avg_jax import partitioning
from avg_jax.aot.programs import Program
from avg_jax.aot.topology import Chip, GiB


@dataclasses.dataclass
class StepReport:
  """What one step costs on one device of the topology (bytes per device, FLOPs per device)."""

  step: str
  description: str
  batch: int
  fits: bool
  compile_s: float
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  total_bytes: int = 0
  hbm_bytes: int = 0
  flops_counted: float = 0.0  # XLA cost analysis as is (loop bodies once)
  flops: float = 0.0  # with the uncounted loop iterations added
  bytes_accessed: float = 0.0
  t_at_peak_s: float = 0.0
  t_roofline_s: float = 0.0
  t_assumed_s: float = 0.0
  mfu_estimate: float = 0.0
  error: str = ""

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _first(analysis: Any) -> dict:
  # Older jax returns a list with one dict per program; newer a dict.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def compile_program(program: Program, mesh) -> Any:
  """`program.jitted.lower(*program.args).compile()` with the mesh's axis rules active."""
  with partitioning.activation_context(mesh):
    return program.jitted.lower(*program.args).compile()


def cost(compiled) -> tuple[float, float]:
  """`(flops, bytes accessed)` per device of a compiled SPMD program."""
  c = _first(compiled.cost_analysis())
  return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


_HBM_USED = re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")


def _resource_exhausted(error: Exception) -> str | None:
  """The compiler's one-line reason when `error` is an out-of-memory compile failure."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
    return None
  used = _HBM_USED.search(text)
  if used:
    return (
      f"RESOURCE_EXHAUSTED: used {used.group(1)}{used.group(2)} of {used.group(3)}"
      f"{used.group(4)} HBM"
    )
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[0][:300] if lines else "RESOURCE_EXHAUSTED"


def analyse(program: Program, mesh, chip: Chip, roofline_efficiency: float) -> StepReport:
  """Compiles `program` (and its loop body) and derives the per-step figures."""
  start = time.perf_counter()
  try:
    compiled = compile_program(program, mesh)
  except Exception as e:  # XLA raises JaxRuntimeError/XlaRuntimeError depending on version
    reason = _resource_exhausted(e)
    if reason is None:
      raise
    return StepReport(
      program.name,
      program.description,
      program.batch,
      fits=False,
      compile_s=time.perf_counter() - start,
      hbm_bytes=chip.hbm_bytes,
      error=reason,
    )
  mem = compiled.memory_analysis()
  flops_counted, bytes_accessed = cost(compiled)
  flops = flops_counted
  if program.loop_body is not None and program.loop_extra:
    body_flops, body_bytes = cost(compile_program(program.loop_body, mesh))
    flops += program.loop_extra * body_flops
    bytes_accessed += program.loop_extra * body_bytes
  compile_s = time.perf_counter() - start
  args, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  total = args + out - alias + temp
  t_peak = flops / chip.peak_bf16_flops
  t_roof = max(t_peak, bytes_accessed / chip.hbm_bandwidth)
  t_assumed = t_roof / roofline_efficiency
  return StepReport(
    program.name,
    program.description,
    program.batch,
    fits=total <= chip.hbm_bytes,
    compile_s=compile_s,
    argument_bytes=args,
    output_bytes=out,
    alias_bytes=alias,
    temp_bytes=temp,
    total_bytes=total,
    hbm_bytes=chip.hbm_bytes,
    flops_counted=flops_counted,
    flops=flops,
    bytes_accessed=bytes_accessed,
    t_at_peak_s=t_peak,
    t_roofline_s=t_roof,
    t_assumed_s=t_assumed,
    mfu_estimate=t_peak / t_assumed if t_assumed > 0 else 0.0,
  )


def format_table(reports: list[StepReport]) -> str:
  """A fixed-width table of the reports (GiB per device, GFLOPs per device and step)."""
  header = (
    "step",
    "batch",
    "args GiB",
    "temp GiB",
    "out GiB",
    "total GiB",
    "HBM %",
    "fits",
    "GFLOP/dev",
    "t@100% ms",
    "t_assumed ms",
    "MFU est",
  )
  rows = []
  for r in reports:
    if r.error:
      rows.append((r.step, str(r.batch), "-", "-", "-", "-", "-", "no", "-", "-", "-", "-"))
      continue
    gib = lambda b: f"{b / GiB:.3g}"
    rows.append(
      (
        r.step,
        str(r.batch),
        gib(r.argument_bytes),
        gib(r.temp_bytes),
        gib(r.output_bytes),
        gib(r.total_bytes),
        f"{100 * r.total_bytes / r.hbm_bytes:.0f}",
        "yes" if r.fits else "no",
        f"{r.flops / 1e9:.4g}",
        f"{1e3 * r.t_at_peak_s:.3g}",
        f"{1e3 * r.t_assumed_s:.3g}",
        f"{100 * r.mfu_estimate:.1f}%",
      )
    )
  widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(
    c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
  )
  out = [line(header), line(["-" * w for w in widths])]
  out += [line(row) for row in rows]
  out += [f"  {r.step}: {r.error}" for r in reports if r.error]
  return "\n".join(out)
