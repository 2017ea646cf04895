"""Activation quantization as a leaf kind: `ActQuantized(w, bits, grid)` rounds a linear's input per token before
its matmul with `w` (dense, Masked or Quantized), with the scale computed from each token on the fly (dynamic).

Three grids, symmetric about zero unless asked otherwise (the token's largest |x| sets the scale):

    'narrow'  codes in [-(2^(b-1) - 1), 2^(b-1) - 1],  s = max|x| / (2^(b-1) - 1)          (W4A4 / W4A8 papers)
    'full'    codes in [-2^(b-1), 2^(b-1) - 1],        s = max|x| / ((2^b - 1) / 2)       (compressed-tensors,
              vLLM: 8 bits give s = max|x| / 127.5; the largest positive value clips to 127)
    'fp8'     float8_e4m3fn values (bits=8),           s = max|x| / 448                   (FP8 W8A8)

A model exported in compressed-tensors' `input_activations` schemes computes what the 'full' and 'fp8' grids
compute here, so only those are written there; 'narrow' and 'full' differ by less than one step.

Asymmetric per-token grids (`symmetric=False`, int grids): each token's own range [min(x, 0), max(x, 0)] sets its
scale s = (hi − lo) / (2^bits − 1) and integer zero point z = round(qmin − lo / s), then x̂ = (clip(round(x / s + z),
lo, hi) − z) · s, as compressed-tensors computes a dynamic asymmetric `token` scheme (vLLM's AZP int8 inputs).

Per-group grids (`group_size=g`, dynamic): each run of g consecutive input channels of a token gets its own scale
(and zero point), compressed-tensors' dynamic `group` activations: one outlier channel then sets the scale of its
group only.

Static scales: with `scale` (a float scalar, and `zero`, an integer scalar, for an asymmetric int grid) the whole
tensor is rounded with that one calibrated scale instead of each token's own (compressed-tensors' static per-tensor
`input_scale` / `input_zero_point`):

    x̂ = (clip(round(x / scale + zero), lo, hi) − zero) · scale

`static_qparams(lo, hi, bits, grid, symmetric)` turns a calibration range into (scale, zero) as compressed-tensors
does: symmetric s = max(|lo|, |hi|) / half_range; asymmetric s = (hi − lo) / (2^bits − 1), zero = round(qmin − lo / s)
clipped to the grid (the range always includes 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize
from jaxcompress.core.matmul import linear

GRIDS = ('narrow', 'full', 'fp8')
FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448


def straight_through(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """w -> fn(w) in the forward pass, identity in the backward pass: d fn(w) / dw := 1."""
  return lambda w: w + jax.lax.stop_gradient(fn(w) - w)


def check_grid(grid: Any, where: str, bits: int | None = None) -> None:
  if grid not in GRIDS:
    raise ValueError(f"{where}: grid={grid!r} is not one of {GRIDS}: 'narrow' rounds to ±(2^(bits-1) - 1), "
                     "'full' to [-2^(bits-1), 2^(bits-1) - 1] as compressed-tensors and vLLM do, 'fp8' to "
                     'float8_e4m3fn values (bits=8).')
  if grid == 'fp8' and bits is not None and bits != 8:
    raise ValueError(f"{where}: grid='fp8' rounds to float8_e4m3fn values: bits={bits} must be 8.")


def token_range(bits: int, grid: str = 'narrow') -> tuple[int, int, float]:
  """(lowest code, highest code, max|x| / scale) of a `bits`-bit symmetric per-token grid."""
  qmax = 2 ** (bits - 1) - 1
  if grid == 'full':
    return -qmax - 1, qmax, (2 ** bits - 1) / 2
  return -qmax, qmax, float(qmax)


def divide(a: jax.Array, b: jax.Array | float) -> jax.Array:
  """a / b correctly rounded, b broadcast to a's shape. XLA rewrites a division by a broadcast value as a
  multiplication by its reciprocal, which moves codes that sit near a rounding boundary: a grid meant to compute
  what another implementation computes (compressed-tensors' in torch) divides here."""
  return a / jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, a.dtype), a.shape))


def quantize_tokens(x: jax.Array, bits: int, grid: str = 'narrow', symmetric: bool = True,
                    group_size: int | None = None) -> jax.Array:
  """x [..., in] rounded per token (or per `group_size` consecutive channels of a token) to a `bits`-bit `grid` (an
  all-zero token keeps scale 1), computed in float32 (with correctly rounded divisions) and returned in x's dtype,
  gradient straight through the rounding. Symmetric: the token's largest |x| sets its scale; asymmetric (int
  grids): its range sets a scale and a zero point (`static_qparams` per token)."""
  if group_size is not None:
    n = x.shape[-1]
    if n % group_size:
      raise ValueError(f'quantize_tokens: group_size={group_size} does not divide the input width {n}; choose a '
                       'divisor of every rounded input, or group_size=None (one scale per token).')
    grouped = x.reshape(*x.shape[:-1], n // group_size, group_size)
    return quantize_tokens(grouped, bits, grid, symmetric).reshape(x.shape)
  if not symmetric:
    x32 = x.astype(jnp.float32)
    s, z = static_qparams(jnp.min(x32, axis=-1, keepdims=True), jnp.max(x32, axis=-1, keepdims=True), bits, grid,
                          symmetric=False)
    return quantize_static(x, bits, grid, s, z)
  if grid == 'fp8':
    lo, hi, half_range = -FP8_MAX, FP8_MAX, FP8_MAX
    snap = lambda r: jnp.clip(r, lo, hi).astype(jnp.float8_e4m3fn).astype(jnp.float32)
  else:
    lo, hi, half_range = token_range(bits, grid)
    snap = lambda r: jnp.clip(jnp.round(r), lo, hi)
  x32 = x.astype(jnp.float32)
  s = divide(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), half_range)
  s = jnp.where(s == 0, 1.0, s)
  return straight_through(lambda v: snap(divide(v, s)) * s)(x32).astype(x.dtype)


def quantize_static(x: jax.Array, bits: int, grid: str, scale: jax.Array, zero: jax.Array | None = None
                    ) -> jax.Array:
  """x [..., in] rounded with one static `scale` (and integer `zero` point: asymmetric, int grids only) for the whole
  tensor, computed in float32 (correctly rounded division) and returned in x's dtype, gradient straight through."""
  x32 = x.astype(jnp.float32)
  s = jnp.asarray(scale, jnp.float32)
  if grid == 'fp8':
    snap = lambda r: jnp.clip(r, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return straight_through(lambda v: snap(divide(v, s)) * s)(x32).astype(x.dtype)
  lo, hi, _ = token_range(bits, grid)
  z = jnp.zeros((), jnp.float32) if zero is None else jnp.asarray(zero, jnp.float32)
  return straight_through(lambda v: (jnp.clip(jnp.round(divide(v, s) + z), lo, hi) - z) * s)(x32).astype(x.dtype)


def static_qparams(lo: jax.Array, hi: jax.Array, bits: int, grid: str, symmetric: bool = True
                   ) -> tuple[jax.Array, jax.Array | None]:
  """(scale float32, zero int32 or None) of a grid covering the range [lo, hi] (scalars: one static per-tensor
  grid; arrays: one grid per entry), stretched to include 0 (a zero range keeps scale 1). Symmetric:
  s = max(|lo|, |hi|) / half_range; asymmetric (int grids): s = (hi − lo) / (2^bits − 1),
  zero = clip(round(qmin − lo / s), qmin, qmax)."""
  lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
  hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
  if symmetric:
    half_range = FP8_MAX if grid == 'fp8' else token_range(bits, grid)[2]
    s = divide(jnp.maximum(-lo, hi), half_range)
    return jnp.where(s == 0, 1.0, s), None
  if grid == 'fp8':
    raise ValueError("static_qparams: grid='fp8' is symmetric (FP8 scales are absmax); give symmetric=True.")
  qmin, qmax, _ = token_range(bits, grid)
  s = divide(hi - lo, float(qmax - qmin))
  s = jnp.where(s == 0, 1.0, s)
  return s, jnp.clip(jnp.round(qmin - divide(lo, s)), qmin, qmax).astype(jnp.int32)


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class ActQuantized(leaf_lib.Compressed):
  """A linear whose input is rounded to `bits` bits on `grid` before the matmul with `w` [in, out] (dense, Masked
  or Quantized): per token (dynamic; `symmetric=False`: each token's range sets a scale and zero point;
  `group_size`: one scale per that many consecutive input channels of a token), or with
  the static per-tensor `scale` [] (and `zero` [] int, with `symmetric=False`) when given. `materialize()` is the
  weight; the activation rounding happens in `matmul`."""

  w: Any
  scale: Any = None  # static per-tensor scale, float []; None: each token's own (dynamic)
  zero: Any = None  # static zero point, int [] (asymmetric int grids); None: symmetric or dynamic
  bits: int = leaf_lib.static(default=8)
  grid: str = leaf_lib.static(default='narrow')
  symmetric: bool = leaf_lib.static(default=True)  # False (int grids): a zero point, static or per token
  group_size: int | None = leaf_lib.static(default=None)  # dynamic only: one scale per this many input channels

  def __post_init__(self):
    check_grid(self.grid, 'ActQuantized', self.bits)
    # (scale and zero are pytree children: tree utilities rebuild the leaf with other objects in their place)
    if hasattr(self.zero, 'shape') and (self.scale is None or self.grid == 'fp8' or self.symmetric):
      raise ValueError(f'ActQuantized: a zero point needs a static scale on an int grid and symmetric=False; got '
                       f'scale={self.scale!r}, grid={self.grid!r}, symmetric={self.symmetric}.')
    if self.group_size is not None and (type(self.group_size) is not int or self.group_size < 1
                                        or hasattr(self.scale, 'shape')):
      raise ValueError(f'ActQuantized: group_size={self.group_size!r} must be a positive int, and per-group scales '
                       'are dynamic (no static scale).')
    if not self.symmetric and self.grid == 'fp8':
      raise ValueError("ActQuantized: grid='fp8' is symmetric (FP8 scales are absmax); give symmetric=True.")
    if hasattr(self.scale, 'shape') and not self.symmetric and not hasattr(self.zero, 'shape'):
      raise ValueError('ActQuantized: a static asymmetric grid (symmetric=False) needs its zero point; give zero= '
                       'or symmetric=True.')

  @property
  def static(self) -> bool:
    return self.scale is not None

  @property
  def shape(self):
    return leaf_lib.shape_of(self.w)

  @property
  def dtype(self):
    return leaf_lib.dtype_of(self.w)

  def materialize(self):
    return leaf_lib.materialize(self.w)

  def matmul(self, x):
    if self.static:
      return linear(quantize_static(x, self.bits, self.grid, self.scale, self.zero), self.w)
    return linear(quantize_tokens(x, self.bits, self.grid, self.symmetric, self.group_size), self.w)

  def _qparams(self) -> list:
    return [a for a in (self.scale, self.zero) if a is not None]

  def stored_params(self):
    return leaf_lib.stored_params(self.w) + sum(int(jnp.size(a)) for a in self._qparams())

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.w) + sum(leaf_lib.memory_bytes(a) for a in self._qparams())

  def disk_bytes(self):
    return leaf_lib.disk_bytes(self.w) + sum(leaf_lib.disk_bytes(a) for a in self._qparams())

  def matmul_flops(self):
    return leaf_lib.matmul_flops(self.w)


def _encode(w: ActQuantized, out: serialize.Writer) -> dict:
  desc = {'bits': w.bits, 'grid': w.grid, 'w': out.weight('.w', w.w)}
  if not w.symmetric:
    desc['symmetric'] = False
  if w.group_size is not None:
    desc['group_size'] = w.group_size
  for name in ('scale', 'zero'):
    if getattr(w, name) is not None:
      out.put(f'.{name}', getattr(w, name))
      desc[name] = True
  return desc


def _decode(desc: dict, src: serialize.Reader) -> ActQuantized:
  qparams = {name: jnp.asarray(src.get(f'.{name}')) for name in ('scale', 'zero') if desc.get(name)}
  return ActQuantized(src.weight('.w', desc['w']), bits=desc['bits'], grid=desc.get('grid', 'narrow'),
                      symmetric=desc.get('symmetric', 'zero' not in qparams), group_size=desc.get('group_size'),
                      **qparams)


serialize.register('act_quantized', ActQuantized, _encode, _decode)
