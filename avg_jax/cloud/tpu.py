"""Builds the `gcloud` commands that create, provision, run on and delete a Cloud TPU slice.

`launch/tpu.sh` is a thin wrapper over `python -m avg_jax.cloud.tpu`. Every subcommand takes
`--dry-run`, which prints the exact commands instead of running them (the tests check them).

The workdir of a pod run must be shared by all hosts (orbax writes one checkpoint from all
processes; process 0 writes the other files). We mount a GCS bucket with gcsfuse at
`/gcs/<bucket>` on every worker and use `--workdir /gcs/<bucket>/<run>`; `fetch` copies results
back with `gcloud storage cp`.
"""

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from avg_jax.errors import UserError

REMOTE_DIR = "avg-jax"  # project checkout on each worker, relative to $HOME
DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
JAX_VERSION = "0.10.2"  # must match requirements.txt

# Chips per host for multi-host slices, and how the number in the accelerator type counts.
# v2/v3/v4/v5p names count TensorCores (2 per chip); v5e/v6e names count chips.
_GENERATIONS = {
  "v2": dict(cores_per_chip=2, chips_per_host=4),
  "v3": dict(cores_per_chip=2, chips_per_host=4),
  "v4": dict(cores_per_chip=2, chips_per_host=4),
  "v5p": dict(cores_per_chip=2, chips_per_host=4),
  "v5litepod": dict(cores_per_chip=1, chips_per_host=4),
  "v6e": dict(cores_per_chip=1, chips_per_host=4),
}
# Single-host slices that hold more chips than a multi-host slice's host does.
_SINGLE_HOST_MAX_CHIPS = {"v5litepod": 8, "v6e": 8}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  zone: str
  project: str
  accelerator: str

  @property
  def generation(self) -> str:
    return self.accelerator.rsplit("-", 1)[0]

  @property
  def chips(self) -> int:
    gen = _GENERATIONS[self.generation]
    return int(self.accelerator.rsplit("-", 1)[1]) // gen["cores_per_chip"]

  @property
  def num_hosts(self) -> int:
    gen = _GENERATIONS[self.generation]
    if self.chips <= _SINGLE_HOST_MAX_CHIPS.get(self.generation, gen["chips_per_host"]):
      return 1
    return self.chips // gen["chips_per_host"]

  def location_flags(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]


def parse_accelerator(accelerator: str) -> None:
  """Validates names such as `v4-32`, `v5p-8`, `v5litepod-16`, `v6e-8`."""
  m = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v6e)-(\d+)", accelerator)
  if not m:
    raise UserError(
      f"unknown accelerator type {accelerator!r} (expected e.g. v4-32, v5p-8, v5litepod-16, v6e-8)"
    )


def create_commands(
  s: Slice, *, runtime: str = DEFAULT_RUNTIME, spot: bool = False
) -> list[list[str]]:
  cmd = [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    s.name,
    *s.location_flags(),
    f"--accelerator-type={s.accelerator}",
    f"--version={runtime}",
  ]
  if spot:
    cmd.append("--spot")
  return [cmd]


def _ssh(s: Slice, command: str, worker: str = "all") -> list[str]:
  return [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    s.name,
    *s.location_flags(),
    f"--worker={worker}",
    f"--command={command}",
  ]


def install_commands(s: Slice, *, archive: str, bucket: str = "") -> list[list[str]]:
  """Copies the project archive to every worker, builds its venv from requirements.txt and
  jax[tpu], and (with `bucket`) mounts gs://bucket at /gcs/bucket with gcsfuse."""
  setup = [
    f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR}",
    f"tar -xzf ~/{os_basename(archive)} -C ~/{REMOTE_DIR}",
    f"cd ~/{REMOTE_DIR}",
    "python3 -m venv .venv",
    ".venv/bin/pip install --quiet --upgrade pip",
    ".venv/bin/pip install --quiet -r requirements.txt",
    f".venv/bin/pip install --quiet 'jax[tpu]=={JAX_VERSION}'",
    ".venv/bin/pip install --quiet --no-deps -e .",
  ]
  commands = [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "scp",
      archive,
      f"{s.name}:~/",
      *s.location_flags(),
      "--worker=all",
    ],
    _ssh(s, " && ".join(setup)),
  ]
  if bucket:
    mount = [
      "sudo apt-get update -qq",
      "sudo apt-get install -y -qq gcsfuse",
      f"sudo mkdir -p /gcs/{bucket}",
      f"sudo chown $USER /gcs/{bucket}",
      f"(mountpoint -q /gcs/{bucket} || gcsfuse --implicit-dirs {bucket} /gcs/{bucket})",
    ]
    commands.append(_ssh(s, " && ".join(mount)))
  return commands


def run_commands(s: Slice, avg_jax_args: Sequence[str], *, log_name: str = "") -> list[list[str]]:
  """Runs `avg-jax ARGS` on every worker at once; output streams back and is kept in
  `~/avg-jax/logs/<log_name>-<host>.log` on each worker."""
  if not avg_jax_args:
    raise UserError("run: give the avg-jax arguments after --, e.g. -- train --config ...")
  args = list(avg_jax_args)
  if s.num_hosts > 1 and not any(a.startswith("--config.distributed.enabled") for a in args):
    # One JAX program over all hosts: jax.distributed.initialize() discovers the TPU pod.
    args.append("--config.distributed.enabled=true")
  log_name = log_name or args[0]
  remote = (
    f"set -o pipefail; cd ~/{REMOTE_DIR} && mkdir -p logs && "
    f".venv/bin/avg-jax {' '.join(shlex.quote(a) for a in args)} "
    f"2>&1 | tee logs/{shlex.quote(log_name)}-$(hostname).log"
  )
  return [_ssh(s, remote)]


def logs_commands(s: Slice, log_name: str, worker: int = 0) -> list[list[str]]:
  if not 0 <= worker < s.num_hosts:
    raise UserError(f"logs: worker {worker} outside [0, {s.num_hosts}) for {s.accelerator}")
  return [
    _ssh(s, f"tail -n 200 -f ~/{REMOTE_DIR}/logs/{shlex.quote(log_name)}-*.log", worker=str(worker))
  ]


def fetch_commands(source: str, dest: str) -> list[list[str]]:
  if not source.startswith("gs://"):
    raise UserError(f"fetch: source must be a gs:// path, got {source!r}")
  return [["gcloud", "storage", "cp", "--recursive", source, dest]]


def delete_commands(s: Slice) -> list[list[str]]:
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", s.name, *s.location_flags(), "--quiet"]]


def os_basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def archive_commands(archive: str) -> list[list[str]]:
  """Packs the committed project (git archive: no venv, no runs) for upload."""
  return [["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"]]


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="launch/tpu.sh", description="Cloud TPU VM / pod slice lifecycle for avg-jax."
  )
  sub = p.add_subparsers(dest="action", required=True)

  def slice_args(q):
    q.add_argument("--name", required=True)
    q.add_argument("--zone", required=True)
    q.add_argument("--project", required=True)
    q.add_argument("--accelerator", required=True, help="e.g. v4-32, v5p-8, v5litepod-16")
    q.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")

  q = sub.add_parser("create")
  slice_args(q)
  q.add_argument("--runtime", default=DEFAULT_RUNTIME)
  q.add_argument("--spot", action="store_true")
  q = sub.add_parser("install")
  slice_args(q)
  q.add_argument("--archive", default="/tmp/avg-jax.tar.gz")
  q.add_argument("--bucket", default="", help="GCS bucket to mount at /gcs/BUCKET")
  q = sub.add_parser("run")
  slice_args(q)
  q.add_argument("--log-name", default="")
  q.add_argument("avg_jax_args", nargs=argparse.REMAINDER)
  q = sub.add_parser("logs")
  slice_args(q)
  q.add_argument("--log-name", required=True)
  q.add_argument("--worker", type=int, default=0)
  q = sub.add_parser("delete")
  slice_args(q)
  q = sub.add_parser("fetch")
  q.add_argument("source")
  q.add_argument("dest")
  q.add_argument("--dry-run", action="store_true")
  return p


def build_commands(argv: Sequence[str]) -> tuple[list[list[str]], bool]:
  """Parses launcher arguments into `(commands, dry_run)`."""
  a = _parser().parse_args(list(argv))
  if a.action == "fetch":
    return fetch_commands(a.source, a.dest), a.dry_run
  parse_accelerator(a.accelerator)
  s = Slice(a.name, a.zone, a.project, a.accelerator)
  if a.action == "create":
    return create_commands(s, runtime=a.runtime, spot=a.spot), a.dry_run
  if a.action == "install":
    return archive_commands(a.archive) + install_commands(
      s, archive=a.archive, bucket=a.bucket
    ), a.dry_run
  if a.action == "run":
    args = [x for x in a.avg_jax_args if x != "--"]
    return run_commands(s, args, log_name=a.log_name), a.dry_run
  if a.action == "logs":
    return logs_commands(s, a.log_name, a.worker), a.dry_run
  return delete_commands(s), a.dry_run


def main(argv: Sequence[str] | None = None) -> int:
  try:
    commands, dry_run = build_commands(sys.argv[1:] if argv is None else argv)
  except UserError as e:
    print(f"launch/tpu.sh: error: {e}", file=sys.stderr)
    return 2
  for cmd in commands:
    print(shlex.join(cmd), flush=True)
    if not dry_run:
      rc = subprocess.call(cmd)
      if rc:
        return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
