"""The Cloud TPU launcher's --dry-run commands for a 1-host and a 4-host slice."""

import shlex
import subprocess

import pytest

from avg_jax.cloud import tpu
from avg_jax.errors import UserError

LOC = ["--zone", "us-central2-b", "--project", "proj"]


def _cmds(*argv):
  commands, dry_run = tpu.build_commands(list(argv))
  assert dry_run
  return [shlex.join(c) for c in commands]


@pytest.mark.parametrize(
  "accelerator, hosts",
  [
    ("v4-8", 1),
    ("v4-32", 4),
    ("v5p-8", 1),
    ("v5litepod-8", 1),
    ("v5litepod-16", 4),
    ("v6e-8", 1),
    ("v5p-32", 4),
  ],
)
def test_hosts_per_slice(accelerator, hosts):
  assert tpu.Slice("n", "z", "p", accelerator).num_hosts == hosts


def test_create_and_delete():
  assert _cmds(
    "create", "--name", "avg", *LOC, "--accelerator", "v4-32", "--spot", "--dry-run"
  ) == [
    "gcloud compute tpus tpu-vm create avg --zone=us-central2-b --project=proj "
    "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
  ]
  assert _cmds("delete", "--name", "avg", *LOC, "--accelerator", "v4-8", "--dry-run") == [
    "gcloud compute tpus tpu-vm delete avg --zone=us-central2-b --project=proj --quiet"
  ]


def test_install_copies_to_all_workers_and_mounts_bucket():
  cmds = _cmds(
    "install", "--name", "avg", *LOC, "--accelerator", "v4-32", "--bucket", "bkt", "--dry-run"
  )
  assert cmds[0] == "git archive --format=tar.gz --output=/tmp/avg-jax.tar.gz HEAD"
  assert cmds[1] == (
    "gcloud compute tpus tpu-vm scp /tmp/avg-jax.tar.gz 'avg:~/' "
    "--zone=us-central2-b --project=proj --worker=all"
  )
  assert "--worker=all" in cmds[2]
  assert ".venv/bin/pip install --quiet -r requirements.txt" in cmds[2]
  assert "'jax[tpu]==0.10.2'" in shlex.split(cmds[2])[-1]
  assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in cmds[3]


def test_run_on_one_host_leaves_distributed_auto():
  (cmd,) = _cmds(
    "run",
    "--name",
    "avg",
    *LOC,
    "--accelerator",
    "v4-8",
    "--dry-run",
    "--",
    "train",
    "--config",
    "configs/flickr30k.py",
    "--workdir",
    "/gcs/b/run",
  )
  remote = shlex.split(cmd)[-1]
  assert "--worker=all" in cmd
  assert remote.startswith("--command=set -o pipefail; cd ~/avg-jax")
  assert ".venv/bin/avg-jax train --config configs/flickr30k.py --workdir /gcs/b/run 2>&1" in remote
  assert "distributed" not in remote


def test_run_on_four_hosts_initialises_jax_distributed():
  (cmd,) = _cmds(
    "run",
    "--name",
    "avg",
    *LOC,
    "--accelerator",
    "v4-32",
    "--dry-run",
    "--",
    "train",
    "--config",
    "configs/flickr30k.py:t5-large",
    "--workdir",
    "/gcs/b/r",
  )
  remote = shlex.split(cmd)[-1]
  assert (
    "avg-jax train --config configs/flickr30k.py:t5-large --workdir /gcs/b/r "
    "--config.distributed.enabled=true"
  ) in remote
  assert "tee logs/train-$(hostname).log" in remote


def test_logs_and_fetch():
  assert _cmds(
    "logs",
    "--name",
    "avg",
    *LOC,
    "--accelerator",
    "v4-32",
    "--log-name",
    "train",
    "--worker",
    "3",
    "--dry-run",
  ) == [
    "gcloud compute tpus tpu-vm ssh avg --zone=us-central2-b --project=proj --worker=3 "
    "'--command=tail -n 200 -f ~/avg-jax/logs/train-*.log'"
  ]
  with pytest.raises(UserError, match="worker 4 outside"):
    tpu.build_commands(
      ["logs", "--name", "a", *LOC, "--accelerator", "v4-32", "--log-name", "x", "--worker", "4"]
    )
  assert _cmds("fetch", "gs://b/run/evaluate", "results/", "--dry-run") == [
    "gcloud storage cp --recursive gs://b/run/evaluate results/"
  ]


def test_bad_accelerator_is_a_one_line_error(repo_root):
  proc = subprocess.run(
    ["bash", "launch/tpu.sh", "create", "--name", "a", *LOC, "--accelerator", "v9-8", "--dry-run"],
    cwd=repo_root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
    "launch/tpu.sh: error: unknown accelerator type 'v9-8' "
    "(expected e.g. v4-32, v5p-8, v5litepod-16, v6e-8)"
  )


def test_local_processes_keep_other_xla_flags():
  from avg_jax.cloud import local_multiprocess

  assert local_multiprocess.xla_flags("", 4) == "--xla_force_host_platform_device_count=4"
  assert local_multiprocess.xla_flags(
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0", 2
  ) == ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
