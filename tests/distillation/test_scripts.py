"""Smoke run of the distillation table script (--small: a tiny random teacher, two steps per row)."""

import json
import subprocess
import sys

import numpy as np

import pytest
from tests.train import pretrain_runs as runs


@pytest.mark.slow
@pytest.mark.subprocess
def test_distill_table_small(tmp_path):
  # --layers=0: a one-block student (the teacher's first), whose three training steps (LM, soft KL, GKD on-policy)
  # compile in about two thirds of the two-block student's time; the rows and the table are the same
  proc = subprocess.run([sys.executable, str(runs.ROOT / 'experiments' / 'tables' / 'distill_table.py'), '--small',
                         '--noseq_kd', '--layers=0', f'--output_dir={tmp_path}'], env=runs.env(1),
                        capture_output=True, text=True, timeout=300, cwd=runs.ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'results.json').read_text())['rows']
  names = [r['row'] for r in rows]
  assert names[:3] == ['teacher', 'layers, untrained', 'scratch (LM, lr 0.003)']
  assert 'layers + soft KL' in names and 'layers + GKD on-policy (JSD b=0.5, lambda=0.5)' in names
  assert all(np.isfinite(r['perplexity']) and r['perplexity'] > 1 for r in rows)
  assert (tmp_path / 'table.md').read_text().count('\n') == len(rows) + 2
