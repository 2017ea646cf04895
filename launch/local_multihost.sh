#!/usr/bin/env bash
# A real multi-process JAX job on one machine: N CPU processes joined by gloo collectives, each with D virtual
# devices. The same program a pod runs; this is how multi-host behaviour is exercised without a pod.
#
#   launch/local_multihost.sh 2 2 experiments/pretrain.py --run_dir=runs/mh --data=2 --fsdp=2
#
# Arguments: processes, devices per process, script, then the script's own flags.
# DRY_RUN=1 prints each process's command line instead of running it.
set -euo pipefail
procs=${1:?processes}; devices=${2:?devices per process}; script=${3:?script}; shift 3
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
export XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu
if [[ -n "${DRY_RUN:-}" ]]; then
  echo "XLA_FLAGS=${XLA_FLAGS} JAX_PLATFORMS=${JAX_PLATFORMS}"
  for ((i = 0; i < procs; i++)); do
    printf '%q ' python3 "$script" "$@" --coordinator="localhost:${port}" --num_processes="$procs" --process_id="$i" \
      --cpu_collectives=gloo
    echo
  done
  exit 0
fi
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM  # forward pre-emption: every process saves
for ((i = 0; i < procs; i++)); do
  python3 "$script" "$@" --coordinator="localhost:${port}" --num_processes="$procs" --process_id="$i" \
    --cpu_collectives=gloo &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while :; do
    rc=0
    wait "$pid" || rc=$?
    # A forwarded INT/TERM interrupts `wait` (rc > 128) while the process is still saving: wait again for the
    # process's own exit status, so a clean shutdown exits 0.
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  ((rc == 0)) || status=$rc
done
exit "$status"
