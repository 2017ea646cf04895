"""Calibrates a tiny Llama on 1 device, on a mesh of virtual devices, or as one of several processes, and
writes the statistics (process 0) to an .npz file: the default reduction's under their names, those of
`deterministic=True` under 'det/' (same mesh) and, with --det_mesh, 'det_mesh/' (another data axis size) and
'det6/' (batches of 6 rows on a 2 x 4 mesh; one process without --det_mesh: on 1 device), and the kernels that
a deterministic `run_sequential` prunes by the statistics under 'det_seq/'.
Run by test_sharded.py in fresh subprocesses:

    python tests/calibration/sharded_run.py OUT.npz [--mesh=4x2] [--det_mesh=8x1] [--offload]
        [--coordinator=localhost:PORT --num_processes=2 --process_id=I]
"""

import argparse
import faulthandler
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, for `tests.` imports


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out')
  parser.add_argument('--mesh', default='')  # 'DATAxOTHER': batch rows over DATA devices, replicated over OTHER
  parser.add_argument('--det_mesh', default='')  # also calibrate deterministically on this mesh (one process)
  parser.add_argument('--offload', action='store_true')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  args = parser.parse_args()
  faulthandler.dump_traceback_later(200, exit=True)  # a stuck run says where, before the test's timeout
  if args.coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  jax.config.update('jax_default_matmul_precision', 'highest')

  import jax.numpy as jnp
  import numpy as np
  from jaxcompress import calibration as cal
  from jaxcompress import core
  from tests.calibration.test_calibrate import LLAMA, OBSERVER, make_batches

  params = LLAMA.init(jax.random.key(0))
  batches = make_batches(3, b=8, t=12, seed=5)
  mesh = None
  if args.mesh:
    mesh = make_mesh(args.mesh)
    # each process passes its own rows: the rows of the devices it holds (processes hold consecutive devices)
    per = 8 // args.num_processes
    lo = args.process_id * per
    batches = [{k: v[lo:lo + per] for k, v in b.items()} for b in batches]

  def flat(prefix, mesh, batches=batches, **kw):
    stats = cal.calibrate(LLAMA, params, batches, OBSERVER, mesh=mesh, data_axis='data', offload=args.offload, **kw)
    return {f'{prefix}{path}/{key}': np.asarray(x) for path, s in stats.items() for key, x in core.flatten(s).items()}

  out = {**flat('', mesh), **flat('det/', mesh, deterministic=True)}
  if args.det_mesh:  # one process: every row of the batch is this process's
    out.update(flat('det_mesh/', make_mesh(args.det_mesh), deterministic=True))
  if args.num_processes == 1:  # 6 rows: 3 per device on a 2 x 4 mesh, not a power of two
    six = make_batches(2, b=6, t=12, seed=6)
    out.update(flat('det6/', make_mesh('2x4') if args.det_mesh else None, six, deterministic=True))

  def prune(i, block, stats):
    # keeps the half of each kernel with the larger |w| sqrt(diag XᵀX), so the mask follows the statistics
    def one(path, w):
      if path not in stats:
        return w
      score = jnp.abs(w) * jnp.sqrt(jnp.diag(stats[path]['xtx']))[:, None]
      return jnp.where(score >= jnp.median(score), w, 0)

    return core.paths.map_with_path(one, block)

  pruned, _ = cal.run_sequential(LLAMA, params, batches, cal.hessian(), prune, mesh=mesh, data_axis='data',
                                 offload=args.offload, keep_stats=False, deterministic=True)
  out.update({f'det_seq/{p}': np.asarray(x) for p, x in core.flatten(pruned['layers']).items()
              if p.endswith('kernel')})
  if jax.process_index() == 0:
    np.savez(args.out, **out)


def make_mesh(shape: str) -> jax.sharding.Mesh:
  data, other = (int(n) for n in shape.split('x'))
  return jax.make_mesh((data, other), ('data', 'other'), devices=jax.devices(),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


if __name__ == '__main__':
  main()
