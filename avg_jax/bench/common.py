"""What every benchmark result records about where and how it was measured."""

import datetime
import os
import platform
import sys

import jax


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def machine_info(command: str | None = None, **extra) -> dict:
  """Processor, cores, platform, versions, devices, date, load and the command line.

  Other work on the machine slows wall-clock numbers, so the 1-minute load average is kept.
  """
  info = {
    "processor": platform.processor() or platform.machine(),
    "cpu_model": _cpu_model(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "devices": jax.device_count(),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "load_average_1min": round(os.getloadavg()[0], 2),
    "command": command if command is not None else " ".join(["avg-jax"] + sys.argv[1:]),
  }
  info.update(extra)
  return info
