"""Runs experiments/pretrain.py in subprocesses with a tiny model, for tests that need fresh processes
(virtual device counts, several hosts, kills)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from tests import xla_settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / 'experiments' / 'pretrain.py'
TINY = ['--num_layers=2', '--hidden_size=64', '--intermediate_size=128', '--num_heads=4', '--num_kv_heads=2',
        '--vocab_size=512', '--batch_size=8', '--seq_len=32', '--eval_every=0', '--log_every=1', '--progress=false',
        '--export=false', '--learning_rate=3e-3', '--warmup_steps=2']


# Virtual devices are threads of one process: on a loaded 2-core machine one may reach a collective long after
# the others, and XLA's default gives up after 40 s. Tests wait for it.
PATIENT_COLLECTIVES = '--xla_cpu_collective_call_terminate_timeout_seconds=900'


def env(devices: int = 1) -> dict:
  out = dict(os.environ)
  out['XLA_FLAGS'] = xla_settings.xla_flags(devices, PATIENT_COLLECTIVES)
  out['JAX_PLATFORMS'] = 'cpu'
  out['PYTHONUNBUFFERED'] = '1'
  return out


def command(run_dir: Path, *flags: str) -> list[str]:
  return [sys.executable, str(SCRIPT), f'--run_dir={run_dir}', *TINY, *flags]


def run(run_dir: Path, *flags: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
  proc = subprocess.run(command(run_dir, *flags), env=env(devices), capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)
  if proc.returncode != 0:
    raise AssertionError(f'pretrain failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def start(run_dir: Path, *flags: str, devices: int = 1, log: Path | None = None) -> subprocess.Popen:
  out = open(log, 'w') if log else subprocess.DEVNULL
  return subprocess.Popen(command(run_dir, *flags), env=env(devices), stdout=out, stderr=subprocess.STDOUT,
                          cwd=ROOT)


def results(run_dir: Path) -> dict:
  return json.loads((Path(run_dir) / 'results.json').read_text())


def losses(run_dir: Path) -> dict[int, float]:
  out = {}
  for line in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out


def checkpoint_steps(run_dir: Path) -> list[int]:
  d = Path(run_dir) / 'checkpoints'
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / 'commit_success.txt').exists())


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]
