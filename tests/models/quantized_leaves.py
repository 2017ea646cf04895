"""Test support for the quantized checkpoint layouts: random int `Quantized` leaves built directly (no quantizer
compiled) and the bit-exact comparison of two trees of them."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.core import quantized as quantized_lib
from jaxcompress.models import packed as packed_lib


def random_leaf(shape, bits=4, group_size=None, symmetric=True, fmt='int', seed=0, zero_low=0, act_order=False):
  """A `Quantized` leaf [in, out] with random codes (every code value, 0 included), float32 scales and, when
  asymmetric, random integer zero points in [zero_low, 2**bits); act_order: groups of a random permutation of the
  inputs (a g_idx, as GPTQ's act-order with static_groups=False leaves)."""
  rng = np.random.RandomState(seed)
  n_in, n_out = shape
  groups = 1 if group_size is None else n_in // group_size
  codes = rng.randint(0, 2 ** bits, (n_in, n_out)).astype(np.uint8)
  scale = ((0.5 + rng.rand(groups, n_out)) * 0.04 / 2 ** (bits - 1)).astype(np.float32)
  zero = (None if symmetric or fmt != 'int' else
          rng.randint(zero_low, 2 ** bits, (groups, n_out)).astype(np.float32))
  packed = quantized_lib.packs(bits) and n_in % (8 // bits) == 0
  g_idx = (jnp.asarray(np.argsort(rng.permutation(n_in)).astype(np.int32) // group_size) if act_order else None)
  return core.Quantized(codes=jnp.asarray(packed_lib.pack_bytes(codes, bits) if packed else codes),
                        scale=jnp.asarray(scale), zero=None if zero is None else jnp.asarray(zero), bits=bits,
                        group_size=group_size, fmt=fmt, packed=packed, logical_shape=tuple(shape), g_idx=g_idx)


def quantize_kernels(params, scheme_of):
  """Every kernel for which scheme_of(path) gives random_leaf kwargs replaced by such a random leaf."""
  def q(path, w):
    kw = scheme_of(path) if path.endswith('/kernel') else None
    return w if kw is None else random_leaf(w.shape, seed=zlib.crc32(path.encode()), **kw)
  return core.map_with_path(q, params)


def round_inputs(params, bits=8, grid='full', symmetric=True, group_size=None):
  """Every `Quantized` leaf of `params` inside an `ActQuantized(bits, grid, symmetric, group_size)` (its input
  rounded per token, or per group of a token's channels)."""
  wrap = lambda w: (core.ActQuantized(w, bits=bits, grid=grid, symmetric=symmetric, group_size=group_size)
                    if isinstance(w, core.Quantized) else w)
  return jax.tree.map(wrap, params, is_leaf=core.is_weight_leaf)


def assert_same_leaves(ours, loaded):
  """The same tree, leaf kinds, static fields and bit-identical codes, scales, zero points and arrays."""
  flat_a, flat_b = core.flatten(ours), core.flatten(loaded)
  assert flat_a.keys() == flat_b.keys()
  for p, a in flat_a.items():
    b = flat_b[p]
    assert type(a) is type(b), p
    if isinstance(a, core.ActQuantized):
      assert (a.bits, a.grid, a.symmetric, a.group_size) == (b.bits, b.grid, b.symmetric, b.group_size), p
      for side in ('scale', 'zero'):  # static activation scales: the same value and dtype
        x, y = getattr(a, side), getattr(b, side)
        assert (x is None) == (y is None), (p, side)
        if x is not None:
          assert np.asarray(x).dtype == np.asarray(y).dtype, (p, side)
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f'{p} {side}')
      assert_same_leaves({'w': a.w}, {'w': b.w})
    elif isinstance(a, core.Quantized):
      assert (a.bits, a.group_size, a.packed, a.shape) == (b.bits, b.group_size, b.packed, b.shape), p
      np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes), err_msg=p)
      np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale), err_msg=p)
      for side in ('zero', 'g_idx'):
        x, y = getattr(a, side), getattr(b, side)
        assert (x is None) == (y is None), (p, side)
        if x is not None:
          np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f'{p} {side}')
    else:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
