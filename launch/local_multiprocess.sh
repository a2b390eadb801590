#!/usr/bin/env bash
# One avg-jax command as 2 JAX processes x 4 fake CPU devices on this machine (gloo collectives),
# the way a multi-host TPU slice runs it:
#   launch/local_multiprocess.sh [--processes 2 --devices 4] -- train --config configs/smoke.py:tiny --workdir runs/mp
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/local.sh env >&2
exec "${AVG_JAX_VENV:-.venv}/bin/python" -m avg_jax.cloud.local_multiprocess "$@"
