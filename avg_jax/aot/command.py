"""`avg-jax compile`: compile every step program of a config for a TPU topology and report.

    avg-jax compile --config configs/flickr30k.py:t5-base --topology v5e:4x4 [--out F.json]
        [--config.mesh.fsdp=4 ...]

Prints a table (per-device bytes and FLOPs per step, fits in HBM?, MFU estimate) and, with
`--out`, writes it as JSON with the machine, command, topology and chip assumptions.
"""

import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from ml_collections import ConfigDict

from avg_jax import partitioning
from avg_jax.aot import analysis, topology
from avg_jax.artifacts import fingerprint, io
from avg_jax.errors import UserError


def _libtpu_version() -> str:
  try:
    from importlib import metadata

    return metadata.version("libtpu")
  except Exception:  # metadata raises PackageNotFoundError; any failure means unknown
    return "unknown"


def machine_info(argv: Sequence[str]) -> dict:
  return {
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "libtpu": _libtpu_version(),
    "date": datetime.date.today().isoformat(),
    "command": "avg-jax " + " ".join(argv),
  }


def select_steps(config: ConfigDict) -> list[str]:
  from avg_jax.aot.programs import STEPS

  steps = [s.strip() for s in config.aot.steps if s.strip()]
  unknown = [s for s in steps if s not in STEPS]
  if unknown or not steps:
    raise UserError(
      f"config key aot.steps: {unknown[0] if unknown else 'empty'!r} is not one "
      f"of {', '.join(STEPS)}"
    )
  return steps


def compile_all(config: ConfigDict, topology_name: str) -> dict:
  """Compiles the selected steps of `config` for `topology_name`; returns the JSON report."""
  from avg_jax.aot import programs

  chip = topology.chip_of(topology_name)
  devices = topology.topology_devices(topology_name)
  mesh = partitioning.make_mesh(config.mesh, devices=devices)
  efficiency = float(config.aot.roofline_efficiency)
  if not 0 < efficiency <= 1:
    raise UserError(f"config key aot.roofline_efficiency must be in (0, 1], got {efficiency}")
  reports = []
  for name in select_steps(config):
    program = programs.BUILDERS[name](config, mesh)
    reports.append(analysis.analyse(program, mesh, chip, efficiency))
    print(f"compiled {name} in {reports[-1].compile_s:.1f}s", file=sys.stderr)
  return {
    "topology": topology.canonical_name(topology_name),
    "chips": len(devices),
    "mesh": {k: int(v) for k, v in mesh.shape.items()},
    "chip_assumptions": {
      "generation": chip.generation,
      "peak_bf16_tflops": chip.peak_bf16_flops / 1e12,
      "hbm_gib": chip.hbm_bytes / topology.GiB,
      "hbm_bandwidth_gbps": chip.hbm_bandwidth / 1e9,
    },
    "roofline_efficiency": efficiency,
    "steps": [r.to_json() for r in reports],
    "_reports": reports,
  }


def run(config: ConfigDict, args: Any, argv: Sequence[str] = ()) -> dict:
  """The CLI entry: `args.topology`, `args.config` and optional `args.out`."""
  if not topology.libtpu_available():
    raise UserError(topology.MISSING_LIBTPU)
  start = time.perf_counter()
  result = compile_all(config, args.topology)
  reports = result.pop("_reports")
  chip = result["chip_assumptions"]
  print(
    f"{result['topology']}: {result['chips']} chips, mesh {result['mesh']}, config "
    f"{args.config}; per device; assumed {chip['generation']}: "
    f"{chip['peak_bf16_tflops']:.0f} TFLOP/s bf16, {chip['hbm_gib']:.0f} GiB HBM at "
    f"{chip['hbm_bandwidth_gbps']:.0f} GB/s; t_assumed = roofline / "
    f"{result['roofline_efficiency']}"
  )
  print(analysis.format_table(reports))
  result.update(
    config=args.config,
    config_hash=fingerprint.config_hash(config),
    machine=machine_info(argv),
    total_s=time.perf_counter() - start,
  )
  if getattr(args, "out", None):
    io.write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
  return result
