"""TPU topologies without TPUs: names, assumed chip specs, and abstract devices from libtpu.

`topology_devices("v5e:4x4")` returns the 16 `TpuDevice`s libtpu describes for that slice, on
any host (a CPU machine included) where the optional `libtpu` package is installed
(`pip install -r requirements-tpu.txt`). Nothing runs on them: they only place the
`ShapeDtypeStruct`s that programs are lowered and compiled for.

Names: `GEN:SHAPE` as libtpu spells them (`v5e:4x4`, `v4:2x2x4`, `v5p:2x2x1`) or Cloud TPU
accelerator types (`v5e-16`, `v4-32`, `v5p-8`; v4/v5p count TensorCores, two per chip).
"""

import dataclasses
import importlib.util
import os
import re

from avg_jax.errors import UserError

GiB = 1024**3
MISSING_LIBTPU = (
  "libtpu not installed: pip install -r requirements-tpu.txt (the optional TPU "
  "extra) to compile for TPU topologies"
)


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip numbers the report assumes (public spec sheets; not measured here)."""

  generation: str
  peak_bf16_flops: float  # FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  megacore: bool  # two TensorCores act as one JAX device (v4, v5p)


CHIPS = {
  "v4": Chip("v4", 275e12, 32 * GiB, 1228e9, True),
  "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, False),
  "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, True),
  "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, False),
}

# Chips -> slice shape for the accelerator-type aliases (the usual single-slice shapes).
_SHAPES_2D = {
  1: "1x1",
  4: "2x2",
  8: "2x4",
  16: "4x4",
  32: "4x8",
  64: "8x8",
  128: "8x16",
  256: "16x16",
}
_SHAPES_3D = {
  4: "2x2x1",
  8: "2x2x2",
  16: "2x2x4",
  32: "2x4x4",
  64: "4x4x4",
  128: "4x4x8",
  256: "4x8x8",
}
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_ALIAS = re.compile(r"^(v4|v5e|v5p|v6e)-(\d+)$")


def canonical_name(name: str) -> str:
  """`v5e-16` -> `v5e:4x4`, `v4-32` -> `v4:2x2x4`; `GEN:SHAPE` names pass through."""
  name = name.strip().lower()
  if _NAME.match(name):
    return name
  alias = _ALIAS.match(name)
  if alias:
    gen, count = alias.group(1), int(alias.group(2))
    chip = CHIPS[gen]
    chips = count // 2 if chip.megacore else count
    shapes = _SHAPES_3D if chip.megacore else _SHAPES_2D
    if (not chip.megacore or count % 2 == 0) and chips in shapes:
      return f"{gen}:{shapes[chips]}"
  raise UserError(
    f"--topology {name!r}: expected GEN:SHAPE (e.g. v5e:4x4, v4:2x2x4, v5p:2x2x1) "
    f"or an accelerator type (e.g. v5e-16, v4-32, v5p-8) of {', '.join(CHIPS)}"
  )


def chip_of(name: str) -> Chip:
  """The assumed chip of a (canonical or alias) topology name."""
  return CHIPS[canonical_name(name).split(":")[0]]


def num_chips(name: str) -> int:
  """Chips in the slice, from its shape (`v4:2x2x4` -> 16)."""
  shape = canonical_name(name).split(":")[1]
  count = 1
  for dim in shape.split("x"):
    count *= int(dim)
  return count


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str) -> list:
  """The abstract `TpuDevice`s of topology `name` (one per chip). Needs libtpu."""
  canonical = canonical_name(name)
  if not libtpu_available():
    raise UserError(MISSING_LIBTPU)
  import jax
  from jax.experimental import topologies

  # This process uses libtpu only as a compiler: keep jax's own backend on the CPU (on a TPU
  # VM it must not claim the chips of a running job), which makes it safe to load libtpu
  # beside another process holding its lockfile (a training job, a second compile).
  # jax's Config sets its options as attributes at run time; its type does not list them.
  if not jax.config.jax_platforms:  # type: ignore[attr-defined]
    jax.config.update("jax_platforms", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # libtpu looks for a TPU VM's worker list and logs a harmless error without one.
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  kwargs = {"chip_config_name": "megacore"} if CHIPS[canonical.split(":")[0]].megacore else {}
  try:
    topology = topologies.get_topology_desc(topology_name=canonical, platform="tpu", **kwargs)
  except Exception as e:  # libtpu raises JaxRuntimeError with a multi-line message
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"--topology {name!r}: libtpu cannot describe {canonical} ({first})") from e
  devices = list(topology.devices)
  if len(devices) != num_chips(canonical):
    raise UserError(
      f"--topology {name!r}: libtpu describes {len(devices)} devices, expected "
      f"{num_chips(canonical)} chips"
    )
  return devices
