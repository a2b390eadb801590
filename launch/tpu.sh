#!/usr/bin/env bash
# Cloud TPU VM / pod slice lifecycle; every action accepts --dry-run (print the gcloud commands).
#   launch/tpu.sh create  --name N --zone Z --project P --accelerator v4-32 [--spot]
#   launch/tpu.sh install --name N --zone Z --project P --accelerator v4-32 [--bucket B]
#   launch/tpu.sh run     --name N --zone Z --project P --accelerator v4-32 -- train \
#                         --config configs/flickr30k.py --workdir /gcs/B/flickr30k
#   launch/tpu.sh logs    --name N ... --log-name train [--worker 3]
#   launch/tpu.sh fetch   gs://B/flickr30k/evaluate results/
#   launch/tpu.sh delete  --name N --zone Z --project P --accelerator v4-32
# Needs the local environment (launch/local.sh env) and, without --dry-run, gcloud.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/local.sh env >&2
exec "${AVG_JAX_VENV:-.venv}/bin/python" -m avg_jax.cloud.tpu "$@"
