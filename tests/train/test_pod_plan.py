"""The pod plan on 16 simulated CPU devices: the sharded training step compiles and really splits the state.

1B width (TinyLlama-1.1B: 2048 wide, 32 heads, 4 key/value heads, SwiGLU 5632, vocab 32000) with 4 layers
instead of 22, so it compiles in seconds; mesh data=2 x fsdp=8, batch 16 x 128, bf16 compute, remat, blocks as a scan.
It runs `experiments/benchmarks/pod_plan.py` in a subprocess because the device count must be in XLA_FLAGS
before jax is imported, and this process has imported it already.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from tests import xla_settings

REPO = pathlib.Path(__file__).resolve().parents[2]
ARGS = ['--devices=16', '--preset=llama_1b', '--layers=4', '--data=2', '--fsdp=8', '--tensor=1', '--batch=16',
        '--seq_len=128', '--compute_dtype=bfloat16', '--remat']


@pytest.fixture(scope='module')
def plan(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp('pod_plan') / 'plan.json'
  env = {k: v for k, v in xla_settings.environ().items() if k != 'JAX_PLATFORMS'}  # pod_plan.py adds the devices
  proc = subprocess.run([sys.executable, str(REPO / 'experiments' / 'benchmarks' / 'pod_plan.py'), *ARGS,
                         f'--out={out}'], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, f'pod_plan.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
  return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.subprocess
def test_compiles_on_the_simulated_mesh(plan):
  assert plan['stage'] == 'done' and 'error' not in plan
  assert plan['device_count'] == 16
  assert plan['mesh'] == {'data': 2, 'fsdp': 8, 'tensor': 1}
  assert plan['config']['num_layers'] == 4 and plan['config']['hidden_size'] == 2048


@pytest.mark.subprocess
def test_sharding_splits_the_state(plan):
  unsharded = plan['state_bytes']  # float32 params + Adam's two moments, on one device
  memory = plan['memory']  # per device, from compiled.memory_analysis()
  assert plan['state_bytes_per_device'] < unsharded / 4
  assert plan['state_bytes_per_device'] <= memory['argument'] < unsharded / 4  # the state (and batch) it is given
  assert memory['alias'] > 0  # the old state is donated to the new one
  assert memory['total'] == memory['argument'] + memory['output'] + memory['temp'] - memory['alias']
  # Temporaries hold one block's gathered weights and gradients at a time (the blocks run as a scan); the CPU
  # compiler gathers them in float32 and reduces gradients by a full all-reduce, hence a looser bound here.
  assert 0 < memory['total'] < unsharded / 3


@pytest.mark.subprocess
def test_uses_collectives(plan):
  ops = plan['collectives']
  assert ops['all-gather']['count'] > 0  # fsdp-sharded weights gathered for the matmuls
  # Gradients of fsdp-sharded weights are reduced across devices: a reduce-scatter on TPU/GPU; the CPU
  # pipeline writes it as an all-reduce followed by a slice.
  assert ops['reduce-scatter']['count'] + ops['all-reduce']['count'] > 0
