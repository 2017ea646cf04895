"""Weight-parallel solves give the same as each problem solved alone. (1 device, 8 virtual devices and 2
processes (gloo) give the same masks, codes and solved weights, bit for bit: test_sharded.py, which launches
those runs once for both.)"""

import jax
import numpy as np

from jaxcompress import calibration as cal
from tests.calibration import parallel_run


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
