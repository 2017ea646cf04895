"""Calibrates a tiny Llama on 1 device, on a mesh of virtual devices, or as one of several processes: the
statistics of the default reduction under their names, those of `deterministic=True` under 'det/' (same mesh)
and, with det_mesh, 'det_mesh/' (another data axis size) and 'det6/' (batches of 6 rows on a 2 x 4 mesh; one
process without det_mesh: on 1 device), and the kernels that a deterministic `run_sequential` prunes by the
statistics under 'det_seq/'. Run by mesh_run.py (for test_sharded.py) in fresh subprocesses."""

import jax
import jax.numpy as jnp
import numpy as np


def statistics(mesh_shape: str = '', det_mesh: str = '', offload: bool = False) -> dict[str, np.ndarray]:
  """mesh_shape 'DATAxOTHER': batch rows over DATA devices, replicated over OTHER ('': the default device);
  det_mesh: also calibrate deterministically on this mesh (one process)."""
  from jaxcompress import calibration as cal
  from jaxcompress import core
  from tests.calibration.test_calibrate import LLAMA, OBSERVER, make_batches

  params = LLAMA.init(jax.random.key(0))
  batches = make_batches(3, b=8, t=12, seed=5)
  mesh = None
  if mesh_shape:
    mesh = make_mesh(mesh_shape)
    # each process passes its own rows: the rows of the devices it holds (processes hold consecutive devices)
    per = 8 // jax.process_count()
    lo = jax.process_index() * per
    batches = [{k: v[lo:lo + per] for k, v in b.items()} for b in batches]

  def flat(prefix, mesh, batches=batches, **kw):
    stats = cal.calibrate(LLAMA, params, batches, OBSERVER, mesh=mesh, data_axis='data', offload=offload, **kw)
    return {f'{prefix}{path}/{key}': np.asarray(x) for path, s in stats.items() for key, x in core.flatten(s).items()}

  out = {**flat('', mesh), **flat('det/', mesh, deterministic=True)}
  if det_mesh:  # one process: every row of the batch is this process's
    out.update(flat('det_mesh/', make_mesh(det_mesh), deterministic=True))
  if jax.process_count() == 1:  # 6 rows: 3 per device on a 2 x 4 mesh, not a power of two
    six = make_batches(2, b=6, t=12, seed=6)
    out.update(flat('det6/', make_mesh('2x4') if det_mesh else None, six, deterministic=True))

  def prune(i, block, stats):
    # keeps the half of each kernel with the larger |w| sqrt(diag XᵀX), so the mask follows the statistics
    def one(path, w):
      if path not in stats:
        return w
      score = jnp.abs(w) * jnp.sqrt(jnp.diag(stats[path]['xtx']))[:, None]
      return jnp.where(score >= jnp.median(score), w, 0)

    return core.paths.map_with_path(one, block)

  pruned, _ = cal.run_sequential(LLAMA, params, batches, cal.hessian(), prune, mesh=mesh, data_axis='data',
                                 offload=offload, keep_stats=False, deterministic=True)
  out.update({f'det_seq/{p}': np.asarray(x) for p, x in core.flatten(pruned['layers']).items()
              if p.endswith('kernel')})
  return out


def make_mesh(shape: str) -> jax.sharding.Mesh:
  data, other = (int(n) for n in shape.split('x'))
  return jax.make_mesh((data, other), ('data', 'other'), devices=jax.devices(),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
