#!/usr/bin/env python3
"""GKE: renders a JobSet manifest that runs one program on every host of a multi-host slice.

    python launch/gke_jobset.py --name=ev1 --image=REGION-docker.pkg.dev/PROJECT/repo/jaxcompress:latest \
        --accelerator=tpu --hosts=4 --chips_per_host=4 --tpu_type=tpu-v5-lite-podslice --tpu_topology=4x4 \
        --run_dir_volume=runs-pvc:/mnt/runs \
        experiments/evaluate.py --model=/mnt/runs/w4 --reference=fixture --output_dir=/mnt/runs/ev1 \
      | kubectl apply -f -

Everything after the script is passed to it unchanged, the same flags the local, SLURM and TPU-VM launchers
pass. The program calls `jax.distributed.initialize()` and needs nothing else:
  tpu  GKE gives every TPU pod TPU_WORKER_HOSTNAMES and TPU_WORKER_ID; jax finds its peers from them, so no
       coordinator flag is added.
  gpu  one pod per host with --gpus_per_host GPUs; the renderer adds --coordinator (pod 0 of the JobSet, by the
       DNS name JobSet gives it), --num_processes and --process_id (the pod's completion index, which Kubernetes
       substitutes into the argument list from the pod's environment).
A failed pod restarts the whole JobSet (--max_restarts times); a program that checkpoints resumes from its
run directory, which must be storage every pod mounts (--run_dir_volume: a PersistentVolumeClaim).
This only renders (a dry run by construction); `kubectl apply -f -` submits it.
"""

from __future__ import annotations

import argparse
import math
import re
import sys

import yaml

COORDINATOR_PORT = 8476  # the port process 0 listens on for jax.distributed (any free port works)
CONTAINER = 'jax'
REPLICATED_JOB = 'workers'


def coordinator_address(name: str) -> str:
  """DNS name of the JobSet's first pod: <jobset>-<replicated job>-<job index>-<pod index>.<jobset subdomain>."""
  return f'{name}-{REPLICATED_JOB}-0-0.{name}:{COORDINATOR_PORT}'


def program_args(args: argparse.Namespace) -> list[str]:
  """The container's command: the script and its flags, plus the process flags a GPU JobSet needs."""
  command = ['python3', args.script, *args.script_args]
  if args.accelerator == 'gpu' and args.hosts > 1:
    command += [f'--coordinator={coordinator_address(args.name)}', f'--num_processes={args.hosts}',
                '--process_id=$(JOB_COMPLETION_INDEX)']
  return command


def manifest(args: argparse.Namespace) -> dict:
  """The JobSet as a dict (yaml.safe_dump writes it)."""
  if args.accelerator == 'tpu':
    resources = {'google.com/tpu': args.chips_per_host}
    node_selector = {'cloud.google.com/gke-tpu-accelerator': args.tpu_type,
                     'cloud.google.com/gke-tpu-topology': args.tpu_topology}
  else:
    resources = {'nvidia.com/gpu': args.gpus_per_host}
    node_selector = {'cloud.google.com/gke-accelerator': args.gpu_type}
  container = {
      'name': CONTAINER, 'image': args.image, 'workingDir': args.workdir, 'command': program_args(args),
      'ports': [{'containerPort': COORDINATOR_PORT}],
      'env': [{'name': 'JOB_COMPLETION_INDEX', 'valueFrom': {'fieldRef': {
          'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}],
      'resources': {'limits': resources},
  }
  pod = {'restartPolicy': 'Never', 'nodeSelector': node_selector, 'containers': [container],
         # SIGTERM first: the training loop saves a checkpoint before the pod goes.
         'terminationGracePeriodSeconds': args.grace_seconds}
  if args.run_dir_volume:
    claim, mount = args.run_dir_volume.split(':', 1)
    container['volumeMounts'] = [{'name': 'runs', 'mountPath': mount}]
    pod['volumes'] = [{'name': 'runs', 'persistentVolumeClaim': {'claimName': claim}}]
  job = {'parallelism': args.hosts, 'completions': args.hosts, 'completionMode': 'Indexed', 'backoffLimit': 0,
         'template': {'spec': pod}}
  return {
      'apiVersion': 'jobset.x-k8s.io/v1alpha2', 'kind': 'JobSet',
      'metadata': {'name': args.name,
                   'annotations': {'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}},
      'spec': {'failurePolicy': {'maxRestarts': args.max_restarts},
               'network': {'enableDNSHostnames': True},
               'replicatedJobs': [{'name': REPLICATED_JOB, 'replicas': 1, 'template': {'spec': job}}]},
  }


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--name', required=True, help='JobSet name (lower-case letters, digits, "-"; at most 40 chars).')
  p.add_argument('--image', required=True, help='Container image holding the repository and its environment.')
  p.add_argument('--accelerator', choices=('tpu', 'gpu'), default='tpu', help='Node pool kind.')
  p.add_argument('--hosts', type=int, default=1, help='Pods (one per host; one JAX process each).')
  p.add_argument('--chips_per_host', type=int, default=4, help='TPU chips each pod requests.')
  p.add_argument('--tpu_type', default='tpu-v5-lite-podslice', help='cloud.google.com/gke-tpu-accelerator.')
  p.add_argument('--tpu_topology', default='2x2', help='cloud.google.com/gke-tpu-topology of the slice.')
  p.add_argument('--gpus_per_host', type=int, default=8, help='GPUs each pod requests.')
  p.add_argument('--gpu_type', default='nvidia-h100-80gb', help='cloud.google.com/gke-accelerator.')
  p.add_argument('--workdir', default='/workspace/jaxcompress', help='Repository root inside the image.')
  p.add_argument('--run_dir_volume', default='', help='CLAIM:MOUNT_PATH of a PersistentVolumeClaim every pod '
                 'mounts (run directories and checkpoints).')
  p.add_argument('--max_restarts', type=int, default=3, help='Whole-JobSet restarts after a pod fails.')
  p.add_argument('--grace_seconds', type=int, default=120, help='Seconds between SIGTERM and SIGKILL.')
  p.add_argument('script', help='The program, relative to --workdir (e.g. experiments/evaluate.py).')
  p.add_argument('script_args', nargs=argparse.REMAINDER, help="The program's own flags, passed unchanged.")
  args = p.parse_args(argv)
  if not re.fullmatch(r'[a-z]([-a-z0-9]{0,38}[a-z0-9])?', args.name):
    p.error(f'--name={args.name!r}: use lower-case letters, digits and "-", starting with a letter, at most 40.')
  for field in ('hosts', 'chips_per_host', 'gpus_per_host'):
    if getattr(args, field) < 1:
      p.error(f'--{field}={getattr(args, field)} must be >= 1.')
  if args.max_restarts < 0 or args.grace_seconds < 0:
    p.error('--max_restarts and --grace_seconds must be >= 0.')
  if args.accelerator == 'tpu':
    if not re.fullmatch(r'\d+(x\d+)+', args.tpu_topology):
      p.error(f'--tpu_topology={args.tpu_topology!r}: give chips per dimension, e.g. 2x2, 4x4 or 2x2x4.')
    chips = math.prod(int(n) for n in args.tpu_topology.split('x'))
    if chips != args.hosts * args.chips_per_host:
      p.error(f'--tpu_topology={args.tpu_topology} has {chips} chips but --hosts={args.hosts} x '
              f'--chips_per_host={args.chips_per_host} = {args.hosts * args.chips_per_host}; make them agree '
              f'(e.g. --hosts={max(chips // args.chips_per_host, 1)}).')
  if args.run_dir_volume and ':' not in args.run_dir_volume:
    p.error(f'--run_dir_volume={args.run_dir_volume!r}: give CLAIM:MOUNT_PATH, e.g. runs-pvc:/mnt/runs.')
  if not args.script.endswith('.py'):
    p.error(f'script {args.script!r}: give the program path (e.g. experiments/evaluate.py) before its flags.')
  return args


def main(argv: list[str]) -> None:
  sys.stdout.write(yaml.safe_dump(manifest(parse(argv)), sort_keys=False))


if __name__ == '__main__':
  main(sys.argv[1:])
