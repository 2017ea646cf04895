"""A distillation step with the teacher FSDP-sharded over 8 virtual devices (in TrainState.frozen, by the same
rules as the student) gives the 1-device loss and update, with the teacher held in float32, bfloat16 or int8."""

import json
import subprocess
import sys

import numpy as np

import pytest
from tests.train import pretrain_runs as runs


@pytest.mark.slow
@pytest.mark.subprocess
def test_sharded_teacher_matches_one_device():
  proc = subprocess.run([sys.executable, str(runs.ROOT / 'tests' / 'distillation' / 'sharded_kd.py')],
                        env=runs.env(8), capture_output=True, text=True, timeout=600, cwd=runs.ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
  res = json.loads(line[len('RESULT '):])
  for storage, r in res.items():
    np.testing.assert_allclose(r['loss_8'], r['loss_1'], rtol=1e-5, err_msg=storage)
    assert r['param_diff'] < 1e-5, (storage, r)
    # Really sharded, not replicated: every kernel and the embedding table (16 matrices; int8 adds scales [1, out],
    # some too narrow to split).
    assert r['teacher_matrices_split'] >= 16, (storage, r)
  f32 = res['float32']
  for storage in ('bfloat16', 'int8'):  # the stored teacher is smaller and grades nearly the same
    assert res[storage]['teacher_bytes'] < 0.6 * f32['teacher_bytes']
    np.testing.assert_allclose(res[storage]['loss_1'], f32['loss_1'], rtol=0.05, err_msg=storage)
