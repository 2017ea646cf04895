"""1 device, 8 virtual devices and 2 processes (gloo) give the same calibration statistics: to float32 rounding
by default, to the bit with deterministic=True (also with one row per device), as the kernels a deterministic
run_sequential prunes by them. And weight-parallel solves give the same masks, codes and solved weights, bit
for bit, on 1 device, 8 virtual devices and 2 processes.

Both come from the same launches of mesh_run.py: one process of 8 virtual devices (also computing the 1-device
results, on its default device), then 2 processes of 2 devices each."""

import subprocess
import sys

import numpy as np

import pytest
from jaxcompress import calibration as cal
from jaxcompress import core
from tests.calibration import ooc_common as oc
from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'tests' / 'calibration' / 'mesh_run.py'


def launch(d, src, *, processes: int, devices: int) -> None:
  """mesh_run.py as `processes` processes (more than 1: a gloo job) of `devices` virtual devices each."""
  port = runs.free_port()
  job = lambda i: [f'--coordinator=localhost:{port}', f'--num_processes={processes}', f'--process_id={i}']
  logs = [d / f'{processes}x{devices}-process{i}.log' for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(d), str(src), *(job(i) if processes > 1 else [])],
                            env=runs.env(devices), stdout=open(log, 'w'), stderr=subprocess.STDOUT, cwd=runs.ROOT)
           for i, log in enumerate(logs)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0] * processes, [log.read_text()[-3000:] for log in logs]


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """{'one' | 'eight' | 'two': {'stats' | 'solve': {name: array}}} and the directory of the runs."""
  d = tmp_path_factory.mktemp('mesh_runs')
  src = oc.write_checkpoint(d / 'ckpt')
  launch(d, src, processes=1, devices=8)  # one after the other: together they would only share the cores
  launch(d, src, processes=2, devices=2)
  return {run: {kind: dict(np.load(d / f'{run}_{kind}.npz')) for kind in ('stats', 'solve')}
          for run in ('one', 'eight', 'two')}, d


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_device_eight_devices_and_two_processes_agree(launched):
  one, eight, two = (launched[0][run]['stats'] for run in ('one', 'eight', 'two'))
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


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_device_eight_devices_and_two_processes_solve_identically(launched):
  results, d = launched
  one, eight, two = (results[run]['solve'] for run in ('one', 'eight', 'two'))
  assert sorted(one) == sorted(eight) == sorted(two)
  assert any('mask' in k for k in one) and any('codes' in k for k in one)
  for name, ref in one.items():
    np.testing.assert_array_equal(eight[name], ref, err_msg=name)
    np.testing.assert_array_equal(two[name], ref, err_msg=name)
  # out of core with data-parallel calibration: statistics summed in another order (float32 rounding), so
  # the masks may differ only where a score ties with the median
  ref = core.flatten(cal.load_compressed(d / 'one_solve.ooc'))
  for other in ('two',):
    got = core.flatten(cal.load_compressed(d / f'{other}_solve.ooc'))
    assert sorted(got) == sorted(ref)
    for path, r in ref.items():
      a, b = np.asarray(core.materialize(got[path])), np.asarray(core.materialize(r))
      assert np.mean(a == b) > 0.99, (other, path)
