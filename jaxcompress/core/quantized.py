"""`Quantized`: a weight stored as low-bit codes plus per-group scales, and round-to-nearest encoders.

Layout. The weight is [in, out]; groups run along `in`: rows g*group_size ... (g+1)*group_size-1 of one column
share a scale (and zero point), so `scale` is [in // group_size, out]. `group_size=None` means one group per
column (per-channel). Codes are unsigned integers in [0, 2**bits), packed along `in` when 8 % bits == 0
(two int4 codes per byte), or one per byte otherwise.

Stacked experts. A mixture-of-experts weight [E, in, out] (`models.moe`) is one leaf whose arrays carry a
leading expert axis (codes [E, in, out], scale [E, in // group_size, out], ...): expert e's slice is exactly a
2-D leaf of this layout, and `materialize` returns [E, in, out].

Formats (static `fmt`):
  'int'       w = (q - zero) * scale                     uniform affine; zero=None means symmetric, zero = 2**(bits-1)
  'nf4'       w = NF4[q] * scale                         NormalFloat-4 (Dettmers et al., 2023), scale = absmax
  'fp8'       w = float(q) * scale                       codes are float8_e4m3fn (or float8_e5m2) values
  'codebook'  w = codebook[q] (* scale if given)         learned levels, [2**bits] or per column [out, 2**bits]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize

Format = Literal['int', 'nf4', 'fp8', 'codebook']
FORMATS = ('int', 'nf4', 'fp8', 'codebook')

# The 16 NormalFloat-4 levels: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, App. E).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


def packs(bits: int) -> bool:
  """Whether codes of this width pack several to a byte in memory."""
  return bits < 8 and 8 % bits == 0


def pack_codes(q: jax.Array, bits: int) -> jax.Array:
  """q: [in, out] uint8 codes < 2**bits -> [in * bits // 8, out] uint8, low bits first."""
  per = 8 // bits
  if q.shape[0] % per:
    raise ValueError(f'pack_codes: in={q.shape[0]} is not a multiple of {per} ({bits}-bit codes per byte).')
  q = q.astype(jnp.uint8).reshape(q.shape[0] // per, per, *q.shape[1:])
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape(1, per, *([1] * (q.ndim - 2)))
  return jnp.bitwise_or.reduce(q << shifts, axis=1).astype(jnp.uint8)


def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack_codes`: [in * bits // 8, out] uint8 -> [in, out] uint8."""
  per = 8 // bits
  shifts = (jnp.arange(per, dtype=jnp.uint8) * bits).reshape(1, per, *([1] * (packed.ndim - 1)))
  q = (packed[:, None] >> shifts) & jnp.uint8((1 << bits) - 1)
  return q.reshape(packed.shape[0] * per, *packed.shape[1:])


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Quantized(leaf_lib.Compressed):
  """Low-bit codes with per-group scales (shapes for a 2-D weight; a stacked [E, in, out] one adds a leading E).

  codes:    [in, out] uint8, or [in * bits // 8, out] uint8 when `packed`; float8_e4m3fn for fmt='fp8'.
  scale:    [in // group_size, out] float (its dtype is the dtype `materialize` returns); None for a plain codebook.
  zero:     like scale, in code units, or None (symmetric: zero = 2**(bits-1)). Only for fmt='int'.
  codebook: [2**bits] or [out, 2**bits] float levels for fmt='codebook', else None.
  g_idx:    [in] int32 group of each input row, or None: groups are runs of group_size consecutive rows. Set by
            GPTQ's act-order with groups formed in the permuted order (the GPTQ layout's `g_idx`); only for
            fmt='int' with a group_size.
  """

  codes: jax.Array
  scale: jax.Array | None
  zero: jax.Array | None = None
  codebook: jax.Array | None = None
  g_idx: jax.Array | None = None
  bits: int = leaf_lib.static(default=4)
  group_size: int | None = leaf_lib.static(default=None)
  fmt: str = leaf_lib.static(default='int')
  packed: bool = leaf_lib.static(default=False)
  logical_shape: tuple[int, ...] = leaf_lib.static(default=())

  def __post_init__(self):
    if self.fmt not in FORMATS:
      raise ValueError(f'Quantized: fmt={self.fmt!r} is not one of {FORMATS}.')
    if not 1 <= self.bits <= 8:
      raise ValueError(f'Quantized: bits={self.bits} is outside 1..8.')
    if self.fmt == 'nf4' and self.bits != 4:
      raise ValueError(f"Quantized: fmt='nf4' needs bits=4, got bits={self.bits}.")
    if len(self.logical_shape) not in (2, 3):
      raise ValueError(f'Quantized: logical_shape must be [in, out] or [experts, in, out], got '
                       f'{self.logical_shape}.')
    # Only arrays are checked: pytree maps (orbax save args, jit shardings) rebuild the leaf with other children.
    if isinstance(self.g_idx, (jax.Array, np.ndarray)) and (self.fmt != 'int' or self.group_size is None):
      raise ValueError(f"Quantized: g_idx needs fmt='int' and a group_size, got fmt={self.fmt!r}, "
                       f'group_size={self.group_size}.')

  @property
  def shape(self):
    return self.logical_shape

  @property
  def dtype(self):
    ref = self.scale if self.scale is not None else self.codebook
    return np.dtype(ref.dtype)

  @property
  def groups(self) -> int:
    return 1 if self.group_size is None else self.shape[-2] // self.group_size

  def codes_unpacked(self) -> jax.Array:
    if not self.packed:
      return self.codes
    if len(self.shape) == 3:
      return jax.vmap(lambda c: unpack_codes(c, self.bits))(self.codes)
    return unpack_codes(self.codes, self.bits)

  def _per_expert(self, fn):
    """fn(expert e's 2-D leaf) for every expert of a stacked [E, in, out] leaf, stacked on a leading axis."""
    arrays = {f: getattr(self, f) for f in _ARRAYS if getattr(self, f) is not None}
    return jax.vmap(lambda a: fn(dataclasses.replace(self, **a, logical_shape=self.shape[1:])))(arrays)

  def _rows(self, per_group: jax.Array) -> jax.Array:
    """[groups, out] -> [in, out]: each row's group's values (runs of rows, or by g_idx)."""
    if self.g_idx is None:
      return _expand(per_group, self.shape[0])
    return jnp.take(jnp.asarray(per_group), jnp.asarray(self.g_idx, jnp.int32), axis=0)

  def _levels(self, q: jax.Array) -> jax.Array:
    """Codes -> unscaled values, float32 [in, out]."""
    if self.fmt == 'int':
      zero = (2 ** (self.bits - 1)) if self.zero is None else self._rows(self.zero)
      return q.astype(jnp.float32) - jnp.asarray(zero, jnp.float32)
    if self.fmt == 'nf4':
      return jnp.asarray(NF4_LEVELS)[q.astype(jnp.int32)]
    if self.fmt == 'fp8':
      return q.astype(jnp.float32)
    book = jnp.asarray(self.codebook, jnp.float32)
    if book.ndim == 1:
      return book[q.astype(jnp.int32)]
    return jnp.take_along_axis(book.T, q.astype(jnp.int32), axis=0)  # per-column levels

  def materialize(self):
    if len(self.shape) == 3:
      return self._per_expert(lambda w: w.materialize())
    w = self._levels(self.codes_unpacked())
    if self.scale is not None:
      w = w * self._rows(self.scale).astype(jnp.float32)
    return w.astype(self.dtype)

  def dequantize(self, dtype=None) -> jax.Array:
    """The dense weight [in, out] in `dtype` (default: the leaf's), formed group-wise with broadcast scales."""
    dtype = self.dtype if dtype is None else dtype
    if len(self.shape) == 3:
      return self._per_expert(lambda w: w.dequantize(dtype))
    if self.fmt != 'int' or self.scale is None or self.g_idx is not None:
      return self.materialize().astype(dtype)
    rows, out = self.shape
    g = self.groups
    q = self.codes_unpacked().reshape(g, rows // g, out).astype(jnp.float32)
    zero = jnp.float32(2 ** (self.bits - 1)) if self.zero is None else self.zero.astype(jnp.float32)[:, None]
    return ((q - zero) * self.scale.astype(jnp.float32)[:, None]).reshape(rows, out).astype(dtype)

  def matmul(self, x):
    """x [..., in] @ self -> [..., out] in x's dtype.

    A backend with a registered weight-only kernel (`register_kernel`; `quantization.kernels.enable()`
    registers the family's Pallas int4/int8 kernel for GPU and TPU) gets it where the kernel supports the leaf. Otherwise the weight
    is dequantized once per call inside the surrounding jit and multiplied by one dense dot in x's dtype: on
    CPU this is measured to be as fast as the float weight (XLA's CPU int8 / bf16 dots are several times
    slower than its float32 one), see experiments/benchmarks/quant_matmul.py.
    """
    kernel = _KERNELS.get(jax.default_backend())
    if kernel is not None and len(self.shape) == 2 and kernel[0](self, x):
      return kernel[1](x, self)
    return jnp.matmul(x, self.dequantize(x.dtype))

  def stored_params(self):
    return self.size

  def memory_bytes(self):
    return sum(leaf_lib.memory_bytes(a) for a in (self.codes, self.scale, self.zero, self.codebook, self.g_idx)
               if a is not None)

  def disk_bytes(self):
    # Codes are bit-packed tightly on disk (three 3-bit codes take 9 bits), side arrays stored as they are.
    side = sum(leaf_lib.memory_bytes(a) for a in (self.scale, self.zero, self.codebook, self.g_idx)
               if a is not None)
    return math.ceil(self.size * self.bits / 8) + side

  def matmul_flops(self):
    return 2 * self.size


# backend name ('gpu', 'tpu', ...) -> (supports(w, x) -> bool, matmul(x, w) -> y): weight-only kernels that a
# family registers; core imports no family, so without a registration every backend dequantizes then dots.
_KERNELS: dict[str, tuple] = {}


def register_kernel(backend: str, supports, matmul) -> None:
  """Use `matmul(x, w)` for `Quantized.matmul` on `backend` wherever `supports(w, x)` is true (static check)."""
  _KERNELS[backend] = (supports, matmul)


def _expand(per_group: jax.Array, rows: int) -> jax.Array:
  """[groups, out] -> [rows, out], each group row repeated rows // groups times."""
  per_group = jnp.asarray(per_group)
  return jnp.repeat(per_group, rows // per_group.shape[0], axis=0, total_repeat_length=rows)


def _grouped(w: jax.Array, group_size: int | None) -> jax.Array:
  """[in, out] -> [groups, group_size, out]."""
  rows = w.shape[0]
  gs = rows if group_size is None else group_size
  if not isinstance(gs, int) or gs <= 0:
    raise ValueError(f'quantize: group_size={group_size!r} must be a positive integer (or None for one group per '
                     'column).')
  if rows % gs:
    raise ValueError(f'quantize: group_size={group_size} does not divide the input dimension {rows}; '
                     f'pick a divisor of {rows} or group_size=None for one group per column.')
  return w.reshape(rows // gs, gs, *w.shape[1:])


def affine_params(w: jax.Array, bits: int, group_size: int | None, symmetric: bool
                  ) -> tuple[jax.Array, jax.Array | None]:
  """Min-max scale (and zero point) per group. w: [in, out] -> scale [groups, out], zero [groups, out] | None."""
  g = _grouped(w.astype(jnp.float32), group_size)
  levels = 2 ** bits - 1
  if symmetric:
    half = 2 ** (bits - 1) - 1 if bits > 1 else 1
    scale = jnp.max(jnp.abs(g), axis=1) / half
    return jnp.where(scale == 0, 1.0, scale), None
  lo, hi = jnp.minimum(g.min(axis=1), 0.0), jnp.maximum(g.max(axis=1), 0.0)
  scale = (hi - lo) / levels
  scale = jnp.where(scale == 0, 1.0, scale)
  zero = jnp.round(-lo / scale)
  return scale, zero


def encode_int(w: jax.Array, scale: jax.Array, zero: jax.Array | None, bits: int) -> jax.Array:
  """Round-to-nearest integer codes for given scales. w: [in, out]; scale, zero: [groups, out] -> uint8 [in, out]."""
  z = 2 ** (bits - 1) if zero is None else _expand(zero, w.shape[0])
  q = jnp.round(w.astype(jnp.float32) / _expand(scale, w.shape[0]) + z)
  lo = 1 if (zero is None and bits > 1) else 0  # symmetric grids leave the lowest code unused
  return jnp.clip(q, lo, 2 ** bits - 1).astype(jnp.uint8)


def quantize(w: jax.Array, *, bits: int = 4, group_size: int | None = 128, fmt: Format = 'int',
             symmetric: bool = False, pack: bool = True, scale_dtype=None) -> Quantized:
  """Round-to-nearest quantization of a dense [in, out] weight into a `Quantized` leaf.

  fmt='int' uses min-max affine scales; 'nf4' absmax scales and NF4 levels; 'fp8' absmax / 448 scales and
  float8_e4m3fn codes. Learned codebooks are built by the quantization family, not here.
  """
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f'quantize: expected a 2-D weight [in, out], got shape {w.shape}.')
  if not isinstance(bits, int) or not 1 <= bits <= 8:
    raise ValueError(f'quantize: bits={bits!r} must be an integer in 1..8.')
  if fmt not in ('int', 'nf4', 'fp8'):
    raise ValueError(f"quantize: fmt={fmt!r}; round-to-nearest supports 'int', 'nf4', 'fp8'.")
  scale_dtype = w.dtype if scale_dtype is None else scale_dtype
  g = _grouped(w.astype(jnp.float32), group_size)
  zero = None
  if fmt == 'int':
    scale, zero = affine_params(w, bits, group_size, symmetric)
    codes = encode_int(w, scale, zero, bits)
  elif fmt == 'nf4':
    bits = 4
    scale = jnp.max(jnp.abs(g), axis=1)
    scale = jnp.where(scale == 0, 1.0, scale)
    x = w.astype(jnp.float32) / _expand(scale, w.shape[0])
    codes = jnp.argmin(jnp.abs(x[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
  else:
    bits = 8
    scale = jnp.max(jnp.abs(g), axis=1) / FP8_MAX
    scale = jnp.where(scale == 0, 1.0, scale)
    codes = (w.astype(jnp.float32) / _expand(scale, w.shape[0])).astype(jnp.float8_e4m3fn)
  packed = bool(pack and fmt != 'fp8' and packs(bits) and w.shape[0] % (8 // bits) == 0)
  if packed:
    codes = pack_codes(codes, bits)
  return Quantized(codes=codes, scale=scale.astype(scale_dtype),
                   zero=None if zero is None else zero.astype(scale_dtype), bits=bits,
                   group_size=group_size, fmt=fmt, packed=packed, logical_shape=tuple(w.shape))


def fake_quantize(w: jax.Array, **kwargs) -> jax.Array:
  """quantize then materialize, in w's dtype (the forward pass of quantization-aware training)."""
  return quantize(w, **kwargs).materialize().astype(w.dtype)


_SIDE = ('scale', 'zero', 'codebook', 'g_idx')
_ARRAYS = ('codes', *_SIDE)


def _encode(w: Quantized, out: serialize.Writer) -> dict:
  """Codes bit-packed to exactly `bits` bits each (fp8 codes as their bytes); side arrays as they are."""
  codes = serialize.host(w.codes_unpacked())
  out.put('.codes', codes.view(np.uint8).reshape(-1) if w.fmt == 'fp8' else serialize.pack_bits(codes, w.bits))
  fields = [f for f in _SIDE if getattr(w, f) is not None]
  for f in fields:
    out.put(f'.{f}', getattr(w, f))
  desc = {'bits': w.bits, 'group_size': w.group_size, 'fmt': w.fmt, 'packed': w.packed, 'shape': list(w.shape),
          'fields': fields}
  if w.fmt == 'fp8':
    desc['fp8'] = np.dtype(w.codes.dtype).name  # float8_e4m3fn or float8_e5m2
  return desc


def _decode(desc: dict, src: serialize.Reader) -> Quantized:
  shape, bits = tuple(desc['shape']), desc['bits']
  raw = src.get('.codes')
  if desc['fmt'] == 'fp8':
    codes = jnp.asarray(raw.view(getattr(ml_dtypes, desc.get('fp8', 'float8_e4m3fn'))).reshape(shape))
  else:
    codes = jnp.asarray(serialize.unpack_bits(raw, bits, math.prod(shape)).reshape(shape))
    if desc['packed']:
      codes = jax.vmap(lambda c: pack_codes(c, bits))(codes) if len(shape) == 3 else pack_codes(codes, bits)
  side = {f: (jnp.asarray(src.get(f'.{f}')) if f in desc['fields'] else None) for f in _SIDE}
  return Quantized(codes=codes, **side, bits=bits, group_size=desc['group_size'], fmt=desc['fmt'],
                   packed=desc['packed'], logical_shape=shape)


serialize.register('quantized', Quantized, _encode, _decode)
