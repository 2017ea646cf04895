"""Smoke runs of the scale benchmark (a tiny model written shard by shard, compressed out of core) and of the
compression pod plan (calibration and solve programs compiled for 8 simulated devices)."""

import json
import pathlib
import subprocess
import sys

import numpy as np

import pytest
from jaxcompress import calibration as cal
from jaxcompress import core
from tests import xla_settings

REPO = pathlib.Path(__file__).resolve().parents[2]
BENCH = REPO / 'experiments' / 'benchmarks'


def env():
  out = {k: v for k, v in xla_settings.environ().items() if k != 'JAX_PLATFORMS'}  # scale.py adds the devices
  out['PYTHONPATH'] = str(REPO)
  return out


@pytest.mark.slow
@pytest.mark.subprocess
def test_pod_plan_compress_compiles_both_programs_with_replicated_statistics(tmp_path):
  out = tmp_path / 'plan.json'
  proc = subprocess.run([sys.executable, str(BENCH / 'pod_plan_compress.py'), '--preset=tiny', '--devices=8',
                         '--batch=8', '--seq_len=16', f'--out={out}'], cwd=REPO, env=env(), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plan = json.loads(out.read_text())
  assert plan['devices'] == 8
  calib, solve = plan['programs']['calibrate'], plan['programs']['gptq']
  assert plan['programs']['sparsegpt']['fits']
  # every kernel's XᵀX (6 of 64², down 128², float32) is an argument of each device, beside its 1/8 of h
  xtx = (6 * 64 * 64 + 128 * 128) * 4
  assert calib['memory']['argument'] >= xtx + 8 * 16 * 64 * 4 // 8
  # one problem per device: w [128, 64] and H [128, 128] float32 among the arguments
  assert solve['memory']['argument'] >= (128 * 64 + 128 * 128) * 4
  assert calib['fits'] and solve['fits']


@pytest.mark.slow
@pytest.mark.subprocess
def test_scale_small_compresses_every_block_out_of_core(tmp_path):
  proc = subprocess.run([sys.executable, str(BENCH / 'scale.py'), '--small', f'--dir={tmp_path}'], cwd=REPO,
                        env=env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results' / 'results.json').read_text())
  assert results['compress']['complete'] and results['summary']['blocks_run'] == 3
  assert results['compress']['matches_in_memory']  # --small also compresses in memory: the same bits
  params = cal.load_compressed(tmp_path / 'out-llama-128x3')
  down = params['layers'][2]['mlp']['down_proj']['kernel']
  assert isinstance(down, core.Masked) and isinstance(down.value, core.Quantized)
  assert abs(float(np.mean(np.asarray(down.mask))) - 0.5) < 0.01
