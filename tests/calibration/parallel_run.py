"""Solves a fixed set of layer problems with `calibration.solve_parallel` on 1 device, on a mesh of virtual
devices, or as one of several processes, and writes every result array (process 0) to an .npz file. Run by
test_parallel.py in fresh subprocesses:

    python tests/calibration/parallel_run.py OUT.npz [--mesh] [--coordinator=localhost:PORT --num_processes=2
        --process_id=I]
"""

import argparse
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, for `tests.` imports


def problems():
  import numpy as np
  rs = np.random.RandomState(3)
  out = {}
  for name, (n_in, n_out) in {'q': (32, 32), 'o': (32, 32), 'k': (32, 16), 'v': (32, 16), 'gate': (32, 64),
                              'up': (32, 64), 'down': (64, 32)}.items():
    x = rs.randn(96, n_in).astype(np.float32) * rs.uniform(0.2, 3, n_in).astype(np.float32)
    out[name] = (rs.randn(n_in, n_out).astype(np.float32), (x.T @ x).astype(np.float32))
  return out


def toy(w, h):
  """A traceable solve: a |w|·sqrt(diag H) half mask, 4-bit round-to-nearest codes, and (H + I)⁻¹ w."""
  import jax.numpy as jnp
  score = jnp.abs(w) * jnp.sqrt(jnp.diagonal(h))[:, None]
  mask = score >= jnp.sort(score.reshape(-1))[score.size // 2]
  scale = jnp.max(jnp.abs(w), axis=0) / 7
  return {'mask': mask, 'codes': jnp.round(w / scale).astype(jnp.int8), 'scale': scale,
          'solved': jnp.linalg.solve(h + jnp.eye(h.shape[0]), w)}


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--mesh', action='store_true')
  parser.add_argument('--ooc', default='', help='also compress this checkpoint out of core (into OUT.ooc/)')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  args = parser.parse_args()
  if args.coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)

  import numpy as np
  from jaxcompress import calibration as cal
  from tests.calibration import ooc_common as oc

  mesh = None
  if args.mesh:
    mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  probs = problems()
  flat = {}
  traced = cal.solve_parallel(toy, probs, mesh=mesh, traceable=True)
  # SparseGPT + GPTQ compile per device and shape: two shapes keep the 8-device run short
  hosted = cal.solve_parallel(lambda w, h: oc.compress_kernel(w, {'xtx': h}),
                              {n: probs[n] for n in ('q', 'o', 'gate', 'up')}, mesh=mesh)
  for tag, results in (('toy', traced), ('sparsegpt_gptq', hosted)):
    for name, tree in results.items():
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[f'{tag}/{name}{jax.tree_util.keystr(path)}'] = np.asarray(x)
  if args.ooc:  # data-parallel calibration + the cheap solver, rows split over the processes
    per = 8 // jax.process_count()
    lo = jax.process_index() * per
    batches = [{'tokens': b['tokens'][lo:lo + per]} for b in oc.batches(b=8)]
    cal.compress_checkpoint(args.ooc, f'{args.out}.ooc', oc.cheap_block, batches, observer=cal.hessian(),
                            recipe={'cheap': 1}, per_group=True, mesh=mesh)
  if jax.process_index() == 0:
    np.savez(args.out, **flat)


if __name__ == '__main__':
  main()
