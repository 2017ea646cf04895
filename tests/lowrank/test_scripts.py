"""The low-rank, MiniLM-fidelity and sharing table scripts run end to end in smoke mode and write their tables."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.subprocess
@pytest.mark.parametrize('script, extra', [
    ('lowrank_table.py', ['--methods=svd_llm', '--reductions=0.5', '--steps=1', '--other_allocation=false']),
    # recovery runs in the low-rank smoke run and the sharing tests; the sharing variants share one code path
    ('sharing_table.py', ['--steps=0', '--variants=dense,albert_all_lora']),
    ('lowrank_minilm.py', ['--methods=fwsvd', '--reductions=0.5']),  # a tiny random BERT; output Fisher
])
@pytest.mark.slow
def test_table_script_smoke(script, extra, tmp_path):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, str(REPO / 'experiments' / 'tables' / script), '--small',
                        f'--output_dir={tmp_path}', *extra], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / 'results.json').read_text())['rows']
  table = (tmp_path / 'table.md').read_text()
  if script == 'lowrank_minilm.py':
    assert len(rows) == 1 and all(0 < r['budget_cos_mean'] <= 1 + 1e-6 for r in rows)
    assert all(0 <= r['budget_nn'] <= 1 for r in rows)
    assert '| budget_cos_mean' in table
    return
  assert len(rows) >= 2 and all(r.get('ppl', 1) > 1 for r in rows)
  assert '| ppl' in table or 'ppl |' in table
