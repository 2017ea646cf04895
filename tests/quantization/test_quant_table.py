import pytest
"""experiments/tables/quant_table.py --small runs end to end and writes its table."""

import json
import os
import pathlib
import subprocess
import sys

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
