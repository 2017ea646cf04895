"""Solves a fixed set of layer problems with `calibration.solve_parallel` on 1 device, on a mesh of every
device (virtual devices, or several processes'), and optionally compresses a checkpoint out of core with
data-parallel calibration. Run by mesh_run.py (for test_sharded.py) in fresh subprocesses; `problems` and
`toy` also by test_parallel.py."""

import jax


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


def solutions(mesh: bool, ooc: str = '', ooc_out: str = '') -> dict:
  """Every result array by name; mesh: solved over every device (else one by one on the default device).
  ooc: also compress this checkpoint out of core into ooc_out, the rows split over the processes."""
  import numpy as np
  from jaxcompress import calibration as cal
  from tests.calibration import ooc_common as oc

  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,)) if mesh else None
  probs = problems()
  flat = {}
  traced = cal.solve_parallel(toy, probs, mesh=mesh, traceable=True)
  # SparseGPT + GPTQ compile per device and shape: three problems of two shapes keep the 8-device run short
  # (round-robin over 2 processes of 2 devices: q and o on the first process's devices, gate on the second's)
  hosted = cal.solve_parallel(lambda w, h: oc.compress_kernel(w, {'xtx': h}),
                              {n: probs[n] for n in ('q', 'o', 'gate')}, mesh=mesh)
  for tag, results in (('toy', traced), ('sparsegpt_gptq', hosted)):
    for name, tree in results.items():
      for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[f'{tag}/{name}{jax.tree_util.keystr(path)}'] = np.asarray(x)
  if ooc:  # data-parallel calibration + the cheap solver, rows split over the processes
    per = 8 // jax.process_count()
    lo = jax.process_index() * per
    batches = [{'tokens': b['tokens'][lo:lo + per]} for b in oc.batches(b=8)]
    cal.compress_checkpoint(ooc, ooc_out, oc.cheap_block, batches, observer=cal.hessian(),
                            recipe={'cheap': 1}, per_group=True, mesh=mesh)
  return flat
