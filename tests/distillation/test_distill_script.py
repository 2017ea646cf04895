import pytest
"""experiments/distill.py: a fresh student distilled with GKD end to end, and its flags refused by name."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tests import xla_settings

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / 'experiments' / 'distill.py'


def run(*flags: str) -> subprocess.CompletedProcess:
  env = xla_settings.environ(PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(SCRIPT), *flags], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=300)


@pytest.mark.slow
@pytest.mark.subprocess
def test_fresh_student_distils_saves_and_reloads(tmp_path):
  from jaxcompress.recipes import lm_runs
  from jaxcompress import models
  from jaxcompress.eval import lm
  proc = run('--small', '--student_layers=fresh', '--student_depth=1', '--student_width=16', '--student_heads=2',
             '--loss=gkd', '--hidden_weight=0.5', '--steps=2', '--batch_size=8', f'--output_dir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / 'results.json').read_text())
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['distill']['output'] == 'jsd' and config['student']['hidden_size'] == 16
  model, params = models.from_pretrained(tmp_path / 'hf')
  assert model.config.num_layers == 1 and model.config.hidden_size == 16
  _, _, _, valid = lm_runs.small_setup(0)  # the held-out rows the script scored
  # The exported student gives the perplexity the script reported (the export holds the trained weights).
  np.testing.assert_allclose(lm.rows_perplexity(model, params, valid).perplexity, r['student_perplexity'],
                             rtol=1e-5)
  assert r['student_perplexity'] != r['student_perplexity_before']


@pytest.mark.subprocess
def test_bad_student_layers_is_refused_by_name(tmp_path):
  proc = run('--small', '--student_layers=0,x', f'--output_dir={tmp_path}')
  assert proc.returncode != 0
  assert "--student_layers='0,x'" in proc.stderr + proc.stdout
