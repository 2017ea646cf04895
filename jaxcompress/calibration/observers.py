"""Observers: what calibration keeps of each linear layer's input, as pure functions.

An `Observer` is `init(path, in_features) -> stats`, `update(stats, x, mask) -> stats` and
`merge(a, b) -> stats` (optax-like; stats is any pytree of arrays). The driver calls `update` on every batch's
input of every linear, inside one jit per block, so only the statistics outlive a batch. Statistics are sums
(or maxima) over tokens, so sharded inputs all-reduce them and the order of batches does not matter beyond
float32 rounding. `merge` joins the statistics of two disjoint sets of tokens (elementwise: a sum, a maximum);
the driver's `deterministic=True` mode folds per-row statistics with it in an order that does not depend on
the number of devices, so the result is the same to the bit on 1 device, N devices and P processes.

    x: [tokens, in] the layer's input rows (any dtype; statistics are float32)
    mask: [tokens] float32, 1 for a real token and 0 for padding (padding rows contribute nothing)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Stats = Any


def add(a: Stats, b: Stats) -> Stats:
  """`Observer.merge` of statistics that are sums over tokens: leafwise a + b."""
  return jax.tree.map(jnp.add, a, b)


def maximum(a: Stats, b: Stats) -> Stats:
  """`Observer.merge` of statistics that are maxima over tokens: leafwise max(a, b)."""
  return jax.tree.map(jnp.maximum, a, b)


class Observer(NamedTuple):
  """init(path, in_features) -> stats; update(stats, x [tokens, in], mask [tokens]) -> stats;
  merge(stats of tokens A, stats of tokens B) -> stats of A and B (elementwise; default: leafwise sum, right for
  any statistics that are sums over tokens, so an observer built with init and update alone keeps working)."""

  init: Callable[[str, int], Stats]
  update: Callable[[Stats, jax.Array, jax.Array], Stats]
  merge: Callable[[Stats, Stats], Stats] = add


def _count(mask: jax.Array) -> jax.Array:
  # int32: exact up to 2**31 tokens, where a float32 count stops being exact at 2**24.
  return jnp.sum(mask > 0, dtype=jnp.int32)


def _masked(x: jax.Array, mask: jax.Array) -> jax.Array:
  return x.astype(jnp.float32) * mask.astype(jnp.float32)[:, None]


WIDE = 4096  # hessian(): inputs wider than this (and a multiple of ROWS) accumulate XᵀX in row blocks of ROWS
ROWS = 1024


def hessian() -> Observer:
  """{'xtx': XᵀX [in, in] float32, 'count': tokens int32}: the layer-wise Hessian of GPTQ / SparseGPT
  (H = 2 XᵀX / count; the solvers scale it themselves)."""

  def init(path: str, in_features: int) -> Stats:
    del path
    return {'xtx': jnp.zeros((in_features, in_features), jnp.float32), 'count': jnp.zeros((), jnp.int32)}

  def update(stats: Stats, x: jax.Array, mask: jax.Array) -> Stats:
    xm = _masked(x, mask)
    # HIGHEST: accelerators would otherwise multiply float32 in bf16 passes.
    dot = lambda a: jnp.matmul(a.T, xm, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    n = xm.shape[1]
    if n <= WIDE or n % ROWS:
      return {'xtx': stats['xtx'] + dot(xm), 'count': stats['count'] + _count(mask)}

    # Wide inputs: ROWS rows of XᵀX at a time, added in place in a loop, so the update needs a [ROWS, in]
    # temporary instead of a second [in, in] beside the statistics (256 MiB at 8192 wide).
    def rows(r, acc):
      part = jax.lax.dynamic_slice_in_dim(xm, r * ROWS, ROWS, axis=1)
      old = jax.lax.dynamic_slice_in_dim(acc, r * ROWS, ROWS, axis=0)
      return jax.lax.dynamic_update_slice_in_dim(acc, old + dot(part), r * ROWS, axis=0)

    return {'xtx': jax.lax.fori_loop(0, n // ROWS, rows, stats['xtx']), 'count': stats['count'] + _count(mask)}

  return Observer(init, update)


def column_norms() -> Observer:
  """{'sq_norm': Σ_t x[t, j]² [in] float32, 'count'}: Wanda's ‖X_j‖₂ is `norms(stats)`."""

  def init(path: str, in_features: int) -> Stats:
    del path
    return {'sq_norm': jnp.zeros((in_features,), jnp.float32), 'count': jnp.zeros((), jnp.int32)}

  def update(stats: Stats, x: jax.Array, mask: jax.Array) -> Stats:
    return {'sq_norm': stats['sq_norm'] + jnp.sum(jnp.square(_masked(x, mask)), axis=0),
            'count': stats['count'] + _count(mask)}

  return Observer(init, update)


def norms(stats: Stats) -> jax.Array:
  """Per-column L2 norms ‖X_j‖₂ [in] from `column_norms()` statistics."""
  return jnp.sqrt(stats['sq_norm'])


def abs_max() -> Observer:
  """{'abs_max': max_t |x[t, j]| [in] float32}: SmoothQuant's and AWQ's per-channel activation range."""

  def init(path: str, in_features: int) -> Stats:
    del path
    return {'abs_max': jnp.zeros((in_features,), jnp.float32)}

  def update(stats: Stats, x: jax.Array, mask: jax.Array) -> Stats:
    # Padding rows become 0, which never exceeds a maximum of absolute values.
    return {'abs_max': jnp.maximum(stats['abs_max'], jnp.max(jnp.abs(_masked(x, mask)), axis=0))}

  return Observer(init, update, maximum)


def min_max() -> Observer:
  """{'min': min(0, min_t x[t, j]), 'max': max(0, max_t x[t, j])} [in] float32: the range a static activation grid
  covers (`core.activations.static_qparams`; the range always includes 0, as compressed-tensors' does)."""

  def init(path: str, in_features: int) -> Stats:
    del path
    return {'min': jnp.zeros((in_features,), jnp.float32), 'max': jnp.zeros((in_features,), jnp.float32)}

  def update(stats: Stats, x: jax.Array, mask: jax.Array) -> Stats:
    # Padding rows become 0, which the range holds already.
    x = _masked(x, mask)
    return {'min': jnp.minimum(stats['min'], jnp.min(x, axis=0)), 'max': jnp.maximum(stats['max'], jnp.max(x, axis=0))}

  def merge(a: Stats, b: Stats) -> Stats:
    return {'min': jnp.minimum(a['min'], b['min']), 'max': jnp.maximum(a['max'], b['max'])}

  return Observer(init, update, merge)


def abs_mean() -> Observer:
  """{'abs_sum': Σ_t |x[t, j]| [in] float32, 'count'}: AWQ's mean activation magnitude is abs_sum / count."""

  def init(path: str, in_features: int) -> Stats:
    del path
    return {'abs_sum': jnp.zeros((in_features,), jnp.float32), 'count': jnp.zeros((), jnp.int32)}

  def update(stats: Stats, x: jax.Array, mask: jax.Array) -> Stats:
    return {'abs_sum': stats['abs_sum'] + jnp.sum(jnp.abs(_masked(x, mask)), axis=0),
            'count': stats['count'] + _count(mask)}

  return Observer(init, update)


def combine(**observers: Observer) -> Observer:
  """One observer whose stats are {name: that observer's stats}, e.g. combine(h=hessian(), m=abs_max())."""
  if not observers:
    raise ValueError('combine: give at least one observer, e.g. combine(hessian=hessian(), max=abs_max()).')
  for name, obs in observers.items():
    if not isinstance(obs, Observer):
      raise TypeError(f'combine: {name}={obs!r} is not an Observer; call the factory, e.g. hessian().')

  def init(path: str, in_features: int) -> Stats:
    return {name: obs.init(path, in_features) for name, obs in observers.items()}

  def update(stats: Stats, x: jax.Array, mask: jax.Array) -> Stats:
    return {name: obs.update(stats[name], x, mask) for name, obs in observers.items()}

  def merge(a: Stats, b: Stats) -> Stats:
    return {name: obs.merge(a[name], b[name]) for name, obs in observers.items()}

  return Observer(init, update, merge)
