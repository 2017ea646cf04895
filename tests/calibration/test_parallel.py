"""Weight-parallel solves: 1 device, 8 virtual devices and 2 processes (gloo) give the same masks, codes and
solved weights, bit for bit, and the same as each problem solved alone."""

import subprocess
import sys

import pytest
import jax
import numpy as np

from jaxcompress import calibration as cal
from jaxcompress import core
from tests.calibration import ooc_common as oc
from tests.calibration import parallel_run
from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'tests' / 'calibration' / 'parallel_run.py'


def command(out, *flags):
  return [sys.executable, str(SCRIPT), str(out), *flags]


def run(out, *flags, devices=1):
  proc = subprocess.run(command(out, *flags), env=runs.env(devices), capture_output=True, text=True, timeout=300,
                        cwd=runs.ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return dict(np.load(out))


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_device_eight_devices_and_two_processes_solve_identically(tmp_path):
  src = oc.write_checkpoint(tmp_path / 'ckpt')
  one = run(tmp_path / 'one.npz', f'--ooc={src}')
  eight = run(tmp_path / 'eight.npz', '--mesh', devices=8)  # out of core on a mesh: the 2-process run below
  port = runs.free_port()
  logs = [tmp_path / f'host{i}.log' for i in range(2)]
  procs = [subprocess.Popen(command(tmp_path / 'two.npz', '--mesh', f'--ooc={src}', f'--coordinator=localhost:{port}',
                                    '--num_processes=2', f'--process_id={i}'),
                            env=runs.env(1), stdout=open(logs[i], 'w'), stderr=subprocess.STDOUT, cwd=runs.ROOT)
           for i in range(2)]
  codes = [p.wait(timeout=300) for p in procs]
  assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
  two = dict(np.load(tmp_path / 'two.npz'))
  assert sorted(one) == sorted(eight) == sorted(two)
  assert any('mask' in k for k in one) and any('codes' in k for k in one)
  for name, ref in one.items():
    np.testing.assert_array_equal(eight[name], ref, err_msg=name)
    np.testing.assert_array_equal(two[name], ref, err_msg=name)
  # out of core with data-parallel calibration: statistics summed in another order (float32 rounding), so
  # the masks may differ only where a score ties with the median
  ref = core.flatten(cal.load_compressed(tmp_path / 'one.npz.ooc'))
  for other in ('two',):
    got = core.flatten(cal.load_compressed(tmp_path / f'{other}.npz.ooc'))
    assert sorted(got) == sorted(ref)
    for path, r in ref.items():
      a, b = np.asarray(core.materialize(got[path])), np.asarray(core.materialize(r))
      assert np.mean(a == b) > 0.99, (other, path)


def test_results_equal_each_problem_solved_alone():
  problems = parallel_run.problems()
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  got = cal.solve_parallel(parallel_run.toy, problems, mesh=mesh, traceable=True)
  assert list(got) == list(problems)
  for name, (w, h) in problems.items():
    alone = jax.jit(parallel_run.toy)(w, h)
    for key in ('mask', 'codes', 'scale'):
      np.testing.assert_array_equal(got[name][key], np.asarray(alone[key]), err_msg=f'{name} {key}')
    # batched and unbatched LU may round differently; against float64:
    ref = np.linalg.solve(h.astype(np.float64) + np.eye(h.shape[0]), w.astype(np.float64))
    np.testing.assert_allclose(got[name]['solved'], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
