"""`Masked`: a weight with a fixed pattern of zeros (unstructured, N:M, block or channel sparsity).

`Masked` keeps the full value and a bool byte per entry, which training needs (the zeros stay zeros under
updates of the full array), but a 50%-sparse float32 weight then takes 1.25x the dense bytes. For inference,
`compact(params)` turns each `Masked` leaf with a plain value into a `PackedMasked`: the kept values and a
one-bit-per-entry map (the on-disk layout of `Masked`), 0.53x the dense bytes at 50% sparsity.
"""

from __future__ import annotations

import dataclasses
import math

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Masked(leaf_lib.Compressed):
  """`value` where `mask` is true, zero elsewhere.

  value: [*shape] float, or a compressed weight (sparse + quantized).
  mask:  bool, broadcastable to `shape` ([in, 1] or [1, out] for whole channels).

  The gradient of `materialize()` with respect to `value` is zero where the mask is false, so training a
  `Masked` leaf keeps its zeros; the pattern itself is data, not a trained parameter.
  """

  value: leaf_lib.Weight
  mask: leaf_lib.Array

  def __post_init__(self):
    # Checked only for real arrays: tree utilities rebuild leaves with None or sentinel children.
    if _has_shape(self.value) and _has_shape(self.mask):
      vshape, mshape = leaf_lib.shape_of(self.value), tuple(self.mask.shape)
      if len(mshape) != len(vshape) or any(m not in (1, v) for m, v in zip(mshape, vshape)):
        raise ValueError(f'Masked: mask shape {mshape} does not broadcast to value shape {vshape}; '
                         'give a mask of the same shape or with 1 on broadcast axes.')

  @property
  def shape(self):
    return leaf_lib.shape_of(self.value)

  @property
  def dtype(self):
    return leaf_lib.dtype_of(self.value)

  def materialize(self):
    dense = leaf_lib.materialize(self.value)
    return jnp.where(self.mask, dense, jnp.zeros((), dense.dtype))

  def kept(self) -> int:
    """Entries the mask keeps (host-side; a mask sharded across processes is counted shard by shard)."""
    # A broadcast mask ([in, 1] or [1, out]) keeps each of its entries once per broadcast copy.
    return leaf_lib.count_nonzero(self.mask) * (self.size // int(np.size(self.mask)))

  def sparsity(self) -> float:
    return 1.0 - self.kept() / self.size

  def stored_params(self):
    if leaf_lib.is_compressed(self.value):
      return leaf_lib.stored_params(self.value)
    return self.kept()

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.value) + leaf_lib.memory_bytes(self.mask)

  def disk_bytes(self):
    # On disk: the kept values of a plain array (or the whole compressed value) and a one-bit-per-entry map.
    bitmap = math.ceil(int(np.size(self.mask)) / 8)
    if leaf_lib.is_compressed(self.value):
      return leaf_lib.disk_bytes(self.value) + bitmap
    return self.kept() * leaf_lib.dtype_of(self.value).itemsize + bitmap

  def matmul_flops(self):
    if leaf_lib.is_compressed(self.value):
      return round(leaf_lib.matmul_flops(self.value) * self.kept() / self.size)
    return 2 * self.kept()


def _has_shape(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _encode(w: Masked, out: serialize.Writer) -> dict:
  """A one-bit-per-entry map, and the kept values of a plain value (or the whole compressed value)."""
  mask = serialize.host(w.mask).astype(bool)
  out.put('.bitmap', np.packbits(mask.reshape(-1), bitorder='little'))
  desc = {'mask_shape': list(mask.shape)}
  if leaf_lib.is_compressed(w.value):
    desc['value'] = out.weight('.value', w.value)
  else:
    value = serialize.host(w.value)
    out.put('.kept', value[np.broadcast_to(mask, value.shape)])
    desc['value'] = {'kind': 'kept', 'shape': list(value.shape), 'dtype': str(value.dtype)}
  return desc


def _decode(desc: dict, src: serialize.Reader) -> Masked:
  shape = tuple(desc['mask_shape'])
  mask = np.unpackbits(src.get('.bitmap'), count=math.prod(shape), bitorder='little').astype(bool).reshape(shape)
  vdesc = desc['value']
  if vdesc['kind'] == 'kept':
    vshape = tuple(vdesc['shape'])
    value = np.zeros(vshape, np.dtype(vdesc['dtype']))
    value[np.broadcast_to(mask, vshape)] = src.get('.kept')
    value = jnp.asarray(value)
  else:
    value = src.weight('.value', vdesc)
  return Masked(value=value, mask=jnp.asarray(mask))


serialize.register('masked', Masked, _encode, _decode)


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder='little').astype(np.int32)
_BYTE_COUNTS = _BYTE_BITS.sum(1)  # [256]: set bits of each byte value
_BITS_BEFORE = np.cumsum(_BYTE_BITS, axis=1) - _BYTE_BITS  # [256, 8]: set bits below bit i of each byte value


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class PackedMasked(leaf_lib.Compressed):
  """The inference form of a `Masked` weight: only the kept values and a bit per entry.

  values: [K] the kept entries in row-major order of `shape` (K = entries the mask keeps).
  bits:   uint8 [ceil(prod(shape) / 8)], the mask over the full shape, bit i of byte j = entry 8 j + i.
  shape, dtype: static, of the dense weight.

  `materialize()` unpacks the bits and scatters the values (a cumulative count gives each kept entry its index
  in `values`); `matmul` multiplies by that dense array, so it saves memory, not time. Not for training: the
  values carry no gradient back to the positions of a full array.
  """

  values: leaf_lib.Array
  bits: leaf_lib.Array
  logical_shape: tuple[int, ...] = leaf_lib.static(default=())

  @property
  def shape(self):
    return tuple(self.logical_shape)

  @property
  def dtype(self):
    return np.dtype(self.values.dtype)

  def mask(self) -> jax.Array:
    """bool [*shape], True where an entry is kept."""
    return jnp.unpackbits(self.bits, count=self.size, bitorder='little').astype(bool).reshape(self.shape)

  def materialize(self):
    if self.values.shape[0] == 0:
      return jnp.zeros(self.shape, self.dtype)
    # Index in `values` of each kept entry: kept entries before its byte (a prefix sum over bytes, 8x shorter
    # than one over entries) plus kept entries before it within its byte (a 256 x 8 table).
    counts = jnp.asarray(_BYTE_COUNTS)[self.bits]
    before_byte = jnp.cumsum(counts) - counts
    slot = (before_byte[:, None] + jnp.asarray(_BITS_BEFORE)[self.bits]).reshape(-1)[:self.size]
    keep = self.mask().reshape(-1)
    dense = jnp.where(keep, self.values[jnp.minimum(slot, self.values.shape[0] - 1)], jnp.zeros((), self.dtype))
    return dense.reshape(self.shape)

  def kept(self) -> int:
    return int(self.values.shape[0])

  def sparsity(self) -> float:
    return 1.0 - self.kept() / self.size

  def stored_params(self):
    return self.kept()

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.values) + leaf_lib.memory_bytes(self.bits)

  def disk_bytes(self):
    return self.memory_bytes()

  def matmul_flops(self):
    return 2 * self.kept()


def pack(w: Masked) -> PackedMasked:
  """A `Masked` weight with a plain (fully addressable) value -> its `PackedMasked` form, host-side."""
  if leaf_lib.is_compressed(w.value):
    raise ValueError(f'pack: the value of this Masked weight is a {type(w.value).__name__}; only a plain '
                     'array value packs (compact() leaves composed weights as they are).')
  value = serialize.host(w.value)
  mask = np.broadcast_to(serialize.host(w.mask).astype(bool), value.shape)
  return PackedMasked(values=jnp.asarray(value[mask]),
                      bits=jnp.asarray(np.packbits(mask.reshape(-1), bitorder='little')),
                      logical_shape=tuple(value.shape))


def compact(params: Any) -> Any:
  """Every `Masked` leaf with a plain value replaced by `pack(leaf)`; everything else as it is."""
  return jax.tree.map(lambda w: pack(w) if isinstance(w, Masked) and not leaf_lib.is_compressed(w.value) else w,
                      params, is_leaf=leaf_lib.is_weight_leaf)


def _encode_packed(w: PackedMasked, out: serialize.Writer) -> dict:
  out.put('.bitmap', w.bits)
  out.put('.kept', w.values)
  return {'shape': list(w.shape), 'dtype': str(w.dtype)}


def _decode_packed(desc: dict, src: serialize.Reader) -> PackedMasked:
  values = src.get('.kept').astype(np.dtype(desc['dtype']))
  return PackedMasked(values=jnp.asarray(values), bits=jnp.asarray(src.get('.bitmap')),
                      logical_shape=tuple(desc['shape']))


serialize.register('packed_masked', PackedMasked, _encode_packed, _decode_packed)
