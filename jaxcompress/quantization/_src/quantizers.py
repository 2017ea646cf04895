"""Round-to-nearest weight quantizers on top of `core.quantize`, with an MSE clipping search.

Every quantizer returns a `core.Quantized` leaf ([in, out] weight, groups along `in`):

    quantize_weight(w, bits=4, group_size=128)                      asymmetric min-max, per group
    quantize_weight(w, bits=8, group_size=None, symmetric=True)     symmetric, per output channel
    quantize_weight(w, group_size=None, per_tensor=True)            one scale for the whole tensor
    quantize_weight(w, fmt='nf4'), fmt='fp8' (e4m3), fmt='fp8_e5m2'
    quantize_weight(w, bits=3, clip='mse')                          shrink each group's range to minimise ‖w − Q(w)‖²

MSE clipping: for every shrink factor p in `clip_grid` (1.0 first), the group's range [lo, hi] (or absmax) is
scaled by p, the group is quantized on that grid, and the p with the smallest squared error per (group,
column) is kept (ties keep the larger range). Per-tensor scales are stored per column (all equal), so the leaf
layout is the per-channel one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes

from jaxcompress import core
from jaxcompress.core import quantized as qlib
from jaxcompress.quantization._src import common

FMTS = ('int', 'nf4', 'fp8', 'fp8_e5m2')
FP8_E5M2_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e5m2).max)  # 57344
DEFAULT_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0, 0.95, ..., 0.5


def quantize_weight(w: jax.Array, *, bits: int = 4, group_size: int | None = 128, symmetric: bool = False,
                    fmt: str = 'int', per_tensor: bool = False, clip: str = 'none',
                    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID, pack: bool = True) -> core.Quantized:
  """Quantize a dense weight w: [in, out] into a `core.Quantized` leaf.

  bits: 2..8 for fmt='int' (4 for 'nf4', 8 for fp8); group_size: rows per scale (divides in) or None for one per
  output column; symmetric: zero = 2^(bits-1) and scale = absmax / (2^(bits-1) - 1); per_tensor: one scale (and
  zero) for the whole tensor (needs group_size=None); clip: 'none' (min-max / absmax) or 'mse' (search the
  shrink factors `clip_grid` per group and column; int and nf4 only).
  """
  where = 'quantize_weight'
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f'{where}: expected a 2-D weight [in, out], got shape {w.shape}.')
  if fmt not in FMTS:
    raise ValueError(f'{where}: fmt={fmt!r} is not one of {FMTS}.')
  if fmt == 'int':
    common.check_bits(bits, where)
  common.check_group_size(group_size, w.shape[0], where)
  if per_tensor and group_size is not None:
    raise ValueError(f'{where}: per_tensor=True needs group_size=None (got {group_size}).')
  if clip not in ('none', 'mse'):
    raise ValueError(f"{where}: clip={clip!r}; use 'none' or 'mse'.")
  if clip == 'mse' and fmt.startswith('fp8'):
    raise ValueError(f"{where}: clip='mse' is for fmt='int' or 'nf4', not {fmt!r}.")
  if not clip_grid or any(not 0 < p <= 1 for p in clip_grid):
    raise ValueError(f'{where}: clip_grid={clip_grid!r} must be shrink factors in (0, 1].')
  common.check_finite(w, 'w', where)
  grid = (1.0,) if clip == 'none' else tuple(clip_grid)
  wf = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  if fmt == 'fp8':
    scale = _absmax(wf, group_size, per_tensor) / qlib.FP8_MAX
    return _fp8_leaf(wf, scale, jnp.float8_e4m3fn, group_size, w.dtype)
  if fmt == 'fp8_e5m2':
    scale = _absmax(wf, group_size, per_tensor) / FP8_E5M2_MAX
    return _fp8_leaf(wf, scale, jnp.float8_e5m2, group_size, w.dtype)
  if fmt == 'nf4':
    codes, scale = _search_nf4(wf, group_size, per_tensor, jnp.asarray(grid, wf.dtype))
    codes = qlib.pack_codes(codes, 4) if pack and w.shape[0] % 2 == 0 else codes
    return core.Quantized(codes=codes, scale=scale.astype(w.dtype), bits=4, group_size=group_size, fmt='nf4',
                          packed=bool(pack and w.shape[0] % 2 == 0), logical_shape=tuple(w.shape))
  codes, scale, zero = _search_int(wf, int(bits), group_size, bool(symmetric), per_tensor,
                                   jnp.asarray(grid, wf.dtype))
  return common.make_leaf(codes, scale, None if symmetric else zero, bits=int(bits), group_size=group_size,
                            shape=tuple(w.shape), scale_dtype=w.dtype, pack=pack)


def _grouped(w, group_size):
  gs = w.shape[0] if group_size is None else group_size
  return w.reshape(w.shape[0] // gs, gs, w.shape[1])


def _absmax(w, group_size, per_tensor):
  """[groups, out] absmax (per-tensor: broadcast to [1, out]); zero groups get 1."""
  a = jnp.max(jnp.abs(_grouped(w, group_size)), axis=1)
  if per_tensor:
    a = jnp.broadcast_to(jnp.max(a), a.shape)
  return jnp.where(a == 0, 1.0, a)


def _fp8_leaf(w, scale, dtype, group_size, out_dtype):
  codes = (w / qlib._expand(scale, w.shape[0])).astype(dtype)
  return core.Quantized(codes=codes, scale=scale.astype(out_dtype), bits=8, group_size=group_size, fmt='fp8',
                        logical_shape=tuple(w.shape))


def int_grid(lo, hi, bits, symmetric):
  """Scale and zero from a range. lo, hi: [...] (lo ≤ 0 ≤ hi) -> scale, zero [...]; zero ranges get scale 1."""
  if symmetric:
    scale = jnp.maximum(-lo, hi) / (2 ** (bits - 1) - 1)
    scale = jnp.where(scale == 0, 1.0, scale)
    return scale, jnp.full_like(scale, 2 ** (bits - 1))
  scale = (hi - lo) / (2 ** bits - 1)
  scale = jnp.where(scale == 0, 1.0, scale)
  return scale, jnp.round(-lo / scale)


def _fake_int(g, scale, zero, bits, symmetric):
  """g: [G, gs, out]; scale, zero: [G, out] -> codes, dequantized."""
  lo = 1 if symmetric else 0
  q = jnp.clip(jnp.round(g / scale[:, None]) + zero[:, None], lo, 2 ** bits - 1)
  return q, (q - zero[:, None]) * scale[:, None]


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'symmetric', 'per_tensor'))
def _search_int(w, bits, group_size, symmetric, per_tensor, grid):
  g = _grouped(w, group_size)
  lo, hi = jnp.minimum(g.min(axis=1), 0.0), jnp.maximum(g.max(axis=1), 0.0)
  if per_tensor:
    lo, hi = jnp.broadcast_to(lo.min(), lo.shape), jnp.broadcast_to(hi.max(), hi.shape)

  def step(best, p):
    scale, zero = int_grid(lo * p, hi * p, bits, symmetric)
    err = jnp.sum((_fake_int(g, scale, zero, bits, symmetric)[1] - g) ** 2, axis=1)
    if per_tensor:
      err = jnp.broadcast_to(err.sum(), err.shape)
    better = err < best[0]
    return (jnp.where(better, err, best[0]), jnp.where(better, scale, best[1]), jnp.where(better, zero, best[2])), None

  inf = jnp.full(lo.shape, jnp.inf)
  (_, scale, zero), _ = jax.lax.scan(step, (inf, jnp.ones_like(lo), jnp.zeros_like(lo)), grid)
  codes = _fake_int(g, scale, zero, bits, symmetric)[0]
  return codes.reshape(w.shape).astype(jnp.uint8), scale, zero


def _nf4_codes(g, scale):
  x = g / scale[:, None]
  return jnp.argmin(jnp.abs(x[..., None] - jnp.asarray(qlib.NF4_LEVELS)), axis=-1)


@functools.partial(jax.jit, static_argnames=('group_size', 'per_tensor'))
def _search_nf4(w, group_size, per_tensor, grid):
  g = _grouped(w, group_size)
  a = _absmax(w, group_size, per_tensor)
  levels = jnp.asarray(qlib.NF4_LEVELS)

  def step(best, p):
    scale = a * p
    err = jnp.sum((levels[_nf4_codes(g, scale)] * scale[:, None] - g) ** 2, axis=1)
    if per_tensor:
      err = jnp.broadcast_to(err.sum(), err.shape)
    better = err < best[0]
    return (jnp.where(better, err, best[0]), jnp.where(better, scale, best[1])), None

  (_, scale), _ = jax.lax.scan(step, (jnp.full(a.shape, jnp.inf), a), grid)
  return _nf4_codes(g, scale).reshape(w.shape).astype(jnp.uint8), scale


def max_error(leaf: core.Quantized) -> jax.Array:
  """The round-to-nearest error bound per element for fmt='int' without clipping: scale / 2, [in, out]."""
  return qlib._expand(jnp.asarray(leaf.scale, jnp.float32), leaf.shape[0]) / 2

