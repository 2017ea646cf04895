"""1 device, 8 virtual devices and 2 processes (gloo) give the same calibration statistics: to float32 rounding
by default, to the bit with deterministic=True (also with one row per device), as the kernels a deterministic
run_sequential prunes by them."""

import subprocess
import sys

import numpy as np

import pytest
from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'tests' / 'calibration' / 'sharded_run.py'


def command(out, *flags):
  return [sys.executable, str(SCRIPT), str(out), *flags]


def run(out, *flags, devices=1):
  proc = subprocess.run(command(out, *flags), env=runs.env(devices), capture_output=True, text=True, timeout=300,
                        cwd=runs.ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
  one = run(tmp_path / 'one.npz')
  eight = run(tmp_path / 'eight.npz', '--mesh=4x2', '--det_mesh=8x1', devices=8)
  port = runs.free_port()
  logs = [tmp_path / f'host{i}.log' for i in range(2)]
  procs = [subprocess.Popen(command(tmp_path / 'two.npz', '--mesh=4x1', '--offload', f'--coordinator=localhost:{port}',
                                    '--num_processes=2', f'--process_id={i}'),
                            env=runs.env(2), stdout=open(logs[i], 'w'), stderr=subprocess.STDOUT, cwd=runs.ROOT)
           for i in range(2)]
  codes = [p.wait(timeout=300) for p in procs]
  assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
  two = dict(np.load(tmp_path / 'two.npz'))
  pruned = [k for k in one if k.startswith('det_seq/')]
  assert any(k.endswith('down_proj/kernel') for k in pruned)
  for name in pruned:
    assert 0.3 < np.mean(one[name] == 0) < 0.7, name  # pruned by the statistics, not left as it was
    for other in (eight, two):
      np.testing.assert_array_equal(other[name], one[name], err_msg=name)
  six = [k for k in one if k.startswith('det6/')]
  assert len(six) == len([k for k in one if not k.startswith('det')])
  for name in six:  # 3 rows per device: every row's statistics gathered, same bits as 1 device
    np.testing.assert_array_equal(eight[name], one[name], err_msg=name)
  names = [k for k in one if not k.startswith('det')]
  assert sorted(k for k in one if not k.startswith('det6/')) == sorted(two)
  assert sorted(one) == sorted(k for k in eight if not k.startswith('det_mesh/'))
  assert sorted(k[len('det_mesh/'):] for k in eight if k.startswith('det_mesh/')) == sorted(names)
  assert any(k.endswith('xtx') for k in one)
  for name in names:
    ref = one[name]
    # deterministic=True: the same bits on 1 device, 4 x 2 and 8 x 1 virtual devices and 2 processes
    for other in (one, eight, two):
      np.testing.assert_array_equal(other[f'det/{name}'], one[f'det/{name}'], err_msg=name)
    np.testing.assert_array_equal(eight[f'det_mesh/{name}'], one[f'det/{name}'], err_msg=name)
    # and the same statistics as the default reduction up to float32 rounding
    np.testing.assert_allclose(one[f'det/{name}'], ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)
    for other in (eight, two):
      if name.endswith('count'):
        assert int(other[name]) == int(ref), name
      else:
        # sums over devices and processes in another order: agreement to float32 rounding
        np.testing.assert_allclose(other[name], ref, rtol=2e-6, atol=1e-6 * np.abs(ref).max(), err_msg=name)
