"""experiments/tables/quant_table.py and quant_minilm.py --small run end to end and write their tables (and
quant_minilm.py its chart)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.subprocess
def test_quant_table_small(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, 'experiments/tables/quant_table.py', '--small', f'--output_dir={tmp_path}'], cwd=REPO,
                 env=env, check=True, capture_output=True, timeout=600)
  res = json.loads((tmp_path / 'results.json').read_text())
  methods = [r['method'] for r in res['rows']]
  assert methods[:4] == ['fp32', 'RTN', 'GPTQ', 'AWQ'] and len(methods) == 6
  assert all(r['nll'] > 0 for r in res['rows'])
  assert 0 < res['size']['ratio'] < 1
  assert (tmp_path / 'table.md').read_text().startswith('| method |')


@pytest.mark.slow
@pytest.mark.subprocess
def test_quant_minilm_small_writes_its_table_and_chart(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, 'experiments/tables/quant_minilm.py', '--small', '--methods=RTN',
                  f'--output_dir={tmp_path}'], cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
  rows = json.loads((tmp_path / 'results.json').read_text())['rows']
  assert [(r['method'], r['setting']) for r in rows] == [('RTN', 'W4 g128'), ('RTN', 'W3 g128')]
  assert all(0 < r['one_minus_cos'] < 0.01 for r in rows)  # a tiny random BERT: rounding costs little, not nothing
  assert (tmp_path / 'quant_minilm.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
