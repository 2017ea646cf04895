#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker through gcloud; jax.distributed.initialize() finds the
# peers from the TPU metadata (the experiments call it when TPU_WORKER_HOSTNAMES lists several hosts).
# The run directory must be a filesystem every host mounts (NFS, Filestore, or a bucket through gcsfuse) so
# each host writes its part of every checkpoint. Maintenance events send SIGTERM: the run saves and exits; run this again to resume.
#
#   TPU=my-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh experiments/pretrain.py --run_dir=/mnt/shared/runs/x --fsdp=256 \
#     --compute_dtype=bfloat16
#
# The script's flags are passed unchanged. DRY_RUN=1 prints the gcloud command instead of running it.
set -euo pipefail
: "${TPU:?name of the TPU VM slice}" "${ZONE:?its zone}"
script=${1:?script}; shift
repo=${REPO_DIR:-\~/jaxcompress}  # expanded on the workers, not here
args=$(printf ' %q' "$@")
command=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  set -e; cd $repo && (test -d .venv || (python3 -m venv .venv && . .venv/bin/activate && pip install -q -e '.[tpu]'))
  . .venv/bin/activate && python3 $script$args")
if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "${command[@]}"; echo; exit 0; fi
"${command[@]}"
