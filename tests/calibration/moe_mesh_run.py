"""Solves the experts of stacked weights with `calibration.solve_experts` (GPTQ and SparseGPT per expert) on one
device and on a mesh of this process's devices, and writes the materialized results to an .npz file. Run by
test_moe.py in a fresh subprocess with 8 virtual devices:

    python tests/calibration/moe_mesh_run.py OUT.npz
"""

import functools
import sys

import jax
import numpy as np


def main(out: str) -> None:
  from jaxcompress import calibration, core, pruning, quantization
  rs = np.random.RandomState(0)
  e, n_in, n_out = 4, 32, 16
  w = rs.randn(e, n_in, n_out).astype(np.float32)
  x = rs.randn(e, 64, n_in).astype(np.float32) * rs.uniform(0.2, 3, (e, 1, n_in)).astype(np.float32)
  h = np.einsum('eti,etj->eij', x, x)
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  solves = {'gptq': functools.partial(quantization.gptq_from_hessian, bits=4, group_size=16),
            'sparsegpt': functools.partial(pruning.sparsegpt_from_hessian, sparsity=0.5)}
  res = {}
  for name, solve in solves.items():
    for where, m in (('one', None), ('mesh', mesh)):
      res[f'{name}/{where}'] = np.asarray(core.materialize(calibration.solve_experts(solve, w, h, mesh=m)))
  np.savez(out, devices=jax.device_count(), **res)


if __name__ == '__main__':
  main(sys.argv[1])
