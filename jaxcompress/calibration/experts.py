"""Layer-wise solves of mixture-of-experts weights: one independent problem per expert.

    leaf = solve_experts(lambda w, h: gptq_from_hessian(w, h, bits=4), w, stats['xtx'], mesh=mesh)

A stacked expert weight w [E, in, out] (`models.moe`) gets its statistics from the driver stacked over experts
([E, ...], each expert's from the tokens routed to it; `calibrate(..., experts=True)`). Expert e's problem is
the 2-D one of a dense linear, (w[e], statistics[e]); the E problems have equal shapes, so
`solve_parallel` spreads them over the mesh's devices. `stack` joins the E 2-D leaves into one leaf whose
`core.materialize` is [E, in, out], as `MoEMLP.weights()` reads it:

    dense array      [E, in, out]
    core.Quantized   codes / scale / zero / codebook with a leading expert axis, logical_shape (E, in, out)
    core.Masked      value stacked as above, mask [E, ...]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxcompress import core
from jaxcompress.calibration.parallel import solve_parallel


def solve_experts(solve: Callable[..., Any], w: Any, *stats: Any, mesh: Mesh | None = None,
                  axis: str | tuple[str, ...] = 'data', traceable: bool = False) -> Any:
  """solve(w[e], *(s[e] for s in stats)) for every expert e, stacked into one leaf [E, in, out].

  w: [E, in, out] float (dense; materialize a Masked stack first). stats: arrays [E, ...] (e.g. XᵀX [E, in, in]).
  mesh, axis, traceable: as in `solve_parallel` (None: the experts one after another on the default device).
  """
  shape = core.shape_of(w)
  if len(shape) != 3:
    raise ValueError(f'solve_experts: w has shape {tuple(shape)}; expected stacked experts [E, in, out].')
  if core.is_compressed(w):
    raise TypeError(f'solve_experts: w is a {type(w).__name__}; give the dense stack (core.materialize it).')
  e = shape[0]
  for k, s in enumerate(stats):
    if np.shape(s)[:1] != (e,):
      raise ValueError(f'solve_experts: statistics {k} have shape {tuple(np.shape(s))}; expected a leading axis '
                       f'of {e} experts (calibrate with experts=True).')
  problems = {str(k): (w[k], *(s[k] for s in stats)) for k in range(e)}
  out = solve_parallel(solve, problems, mesh=mesh, axis=axis, traceable=traceable)
  return stack([out[str(k)] for k in range(e)])


def stack(leaves: Sequence[Any]) -> Any:
  """E leaves of one 2-D weight shape (dense arrays, `core.Quantized`, `core.Masked` of either) -> one leaf
  with a leading expert axis, materializing to [E, in, out]."""
  if not leaves:
    raise ValueError('stack: give at least one leaf.')
  first = leaves[0]
  kinds = {type(x).__name__ for x in leaves}
  if len(kinds) > 1:
    raise TypeError(f'stack: the experts came back as different leaf kinds {sorted(kinds)}; they must agree.')
  if isinstance(first, core.Masked):
    return core.Masked(stack([x.value for x in leaves]), jnp.stack([jnp.asarray(x.mask) for x in leaves]))
  if isinstance(first, core.Quantized):
    static = lambda q: (q.bits, q.group_size, q.fmt, q.packed, q.logical_shape)
    if len(first.shape) != 2 or any(static(q) != static(first) for q in leaves):
      raise ValueError(f'stack: the experts were quantized differently ({sorted({static(q) for q in leaves})}); '
                       'stacking needs one 2-D layout (bits, group_size, fmt, packing, shape).')
    arrays = {f: jnp.stack([jnp.asarray(getattr(q, f)) for q in leaves])
              for f in ('codes', 'scale', 'zero', 'codebook') if getattr(first, f) is not None}
    return dataclasses.replace(first, **arrays, logical_shape=(len(leaves), *first.shape))
  if core.is_compressed(first):
    raise TypeError(f'stack: {type(first).__name__} leaves cannot be stacked over experts; give dense arrays, '
                    'core.Quantized or core.Masked.')
  return jnp.stack([jnp.asarray(x) for x in leaves])


def unseen_identity(xtx: Any, count: Any) -> Any:
  """XᵀX [E, in, in] with the identity for experts that no calibration token reached (count [E] == 0), so
  their solve sees white inputs (GPTQ: round to nearest; SparseGPT: magnitude) instead of no data at all."""
  xtx = jnp.asarray(xtx)
  eye = jnp.eye(xtx.shape[-1], dtype=xtx.dtype)
  return jnp.where((jnp.asarray(count) == 0)[:, None, None], eye, xtx)
