import pytest
"""The pruning table and benchmark scripts run end to end in smoke mode and write their results."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(script, *args):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], env=env, capture_output=True,
                        text=True, check=True, timeout=600).stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_prune_table_small(tmp_path):
  out = run('experiments/tables/prune_table.py', '--small', '--settings=2:4,50%', '--methods=magnitude,wanda,owl',
            f'--output_dir={tmp_path}')  # SparseGPT's model-level run is tested in test_oneshot
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results['rows']) == {'magnitude/2:4', 'wanda/2:4', 'magnitude/50%', 'wanda/50%', 'owl/50%'}
  assert all(s == 0.5 for k, s in results['sparsity'].items() if k != 'owl/50%')
  assert abs(results['sparsity']['owl/50%'] - 0.5) < 0.02  # per-block sparsities around the mean
  assert '| 2:4 |' in out and ' | — |' in out and (tmp_path / 'table.md').exists()  # OWL has no N:M row


@pytest.mark.subprocess
def test_prune_benchmark_small(tmp_path):
  out = run('experiments/benchmarks/prune.py', '--small', '--repeats=1', f'--output_dir={tmp_path}')
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['sparsegpt']['first_wall_s'] > 0 and 'first result (compile included)' in out
  assert {'xtx', 'factor', 'loop', 'compile_factor', 'compile_loop'} <= set(results['sparsegpt_phases'])


@pytest.mark.slow
@pytest.mark.subprocess
def test_structured_prune_small(tmp_path):
  out = run('experiments/tables/structured_prune.py', '--small', '--repeats=1', f'--output_dir={tmp_path}')
  results = json.loads((tmp_path / 'results.json').read_text())
  rows = {r['row']: r for r in results['rows']}
  assert {'dense', 'Fisher 60%', 'Fisher + LS 60%'} <= set(rows)
  assert rows['Fisher 60%']['flops'] <= 0.6 and rows['dense']['nn_agreement'] == 1.0
  assert results['speed']['dense']['speedup_vs_dense'] == 1.0
  assert '| Fisher + LS 60% |' in out and (tmp_path / 'table.md').exists()
