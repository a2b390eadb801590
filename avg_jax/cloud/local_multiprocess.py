"""Runs one `avg-jax` command as N cooperating JAX processes on this machine.

Each process gets `--xla_force_host_platform_device_count=D` fake CPU devices and joins one
`jax.distributed` job on 127.0.0.1 with gloo CPU collectives, so a (data, model) mesh spans all
N * D devices exactly as a multi-host pod slice would. Output lines are prefixed `[pI]`. If one
process fails, the others are stopped and the first failure's exit status is returned.

    python -m avg_jax.cloud.local_multiprocess --processes 2 --devices 4 -- train \
        --config configs/smoke.py:tiny --workdir runs/mp
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_commands(avg_jax_args: Sequence[str], processes: int, port: int) -> list[list[str]]:
  """The command line of each process: the avg-jax args plus its distributed overrides."""
  return [
    [
      sys.executable,
      "-m",
      "avg_jax",
      *avg_jax_args,
      "--config.distributed.enabled=true",
      f"--config.distributed.coordinator_address=127.0.0.1:{port}",
      f"--config.distributed.num_processes={processes}",
      f"--config.distributed.process_id={i}",
      "--config.distributed.cpu_collectives=gloo",
    ]
    for i in range(processes)
  ]


def xla_flags(inherited: str, devices: int) -> str:
  """`inherited` XLA flags with the fake-device count set to `devices` (any other flag kept)."""
  kept = [
    f for f in inherited.split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *kept])


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix} {line}")
    out.flush()


def run(
  avg_jax_args: Sequence[str], *, processes: int = 2, devices: int = 4, timeout: float | None = None
) -> int:
  """Starts the processes, streams their output, returns 0 or the first non-zero status."""
  port = free_port()
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(os.environ.get("XLA_FLAGS", ""), devices)
  )
  procs, pumps = [], []
  for i, cmd in enumerate(process_commands(avg_jax_args, processes, port)):
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(p)
    t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}]", sys.stdout), daemon=True)
    t.start()
    pumps.append(t)
  status = 0
  try:
    remaining = list(procs)
    while remaining:
      for p in list(remaining):
        try:
          rc = p.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
          continue
        remaining.remove(p)
        if rc and not status:
          status = rc
          for other in remaining:  # a lone survivor would block forever in a collective
            other.terminate()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for t in pumps:
      t.join(timeout=5)
  return status


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="launch/local_multiprocess.sh",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=4, help="fake CPU devices per process")
  parser.add_argument("avg_jax_args", nargs=argparse.REMAINDER)
  a = parser.parse_args(sys.argv[1:] if argv is None else argv)
  args = [x for x in a.avg_jax_args if x != "--"]
  if not args:
    parser.error("give the avg-jax command after --")
  return run(args, processes=a.processes, devices=a.devices)


if __name__ == "__main__":
  sys.exit(main())
