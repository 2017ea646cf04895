"""A Pallas weight-only int8 / int4 matmul for small batches (decode GEMV): y = x @ dequantize(codes).

The weight is never materialised in full: each program owns `block_n` output columns, walks the input
dimension in blocks of `block_k` rows (a `lax.fori_loop`), unpacks that block's codes (two 4-bit codes per byte,
low bits first, as `core.Quantized` packs them), applies its group's scale and zero point and accumulates
x_block @ w_block in float32. Only `core.Quantized` leaves with fmt='int' and 4 or 8 bits are handled.

On CPU the kernel runs with `interpret=True` (that is how it is tested, against dequantize-then-matmul); it
has not yet been compiled or timed on a GPU, so it is opt-in: `enable()` registers it with
`core.quantized.register_kernel` for the 'gpu' and 'tpu' backends, after which `core.linear` (through
`Quantized.matmul`) sends every supported leaf there on those backends: fmt='int', 4 or 8 bits, at most
`MAX_ROWS` rows of x (decode; larger prefill batches dequantize and use the backend's dense dot), and an output
width that `BLOCK_N` divides (or smaller than it). CPU keeps the dequantize-then-dot path, which measures
fastest there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxcompress import core


def _block_k(rows: int, group_size: int) -> int:
  """Rows per step: one quantization group (or 256 rows of a per-channel weight when that divides)."""
  if group_size < rows:
    return group_size
  return 256 if rows % 256 == 0 else rows


def quantized_matmul(x: jax.Array, w: core.Quantized, *, block_n: int = 128, interpret: bool | None = None
                     ) -> jax.Array:
  """x: [M, in] float @ w: Quantized [in, out] (fmt='int', bits 4 or 8) -> [M, out] in x's dtype.

  block_n: output columns per program (must divide out). interpret: run the Pallas interpreter (default: when
  the backend is CPU).
  """
  if not isinstance(w, core.Quantized) or w.fmt != 'int' or w.bits not in (4, 8):
    raise ValueError(f'quantized_matmul: needs a Quantized fmt=int weight of 4 or 8 bits, got {w!r:.80}.')
  k, n = w.shape
  if x.ndim != 2 or x.shape[1] != k:
    raise ValueError(f'quantized_matmul: x must be [M, {k}], got {x.shape}.')
  block_n = min(block_n, n)
  if n % block_n:
    raise ValueError(f'quantized_matmul: block_n={block_n} does not divide out={n}.')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  gs = k if w.group_size is None else w.group_size
  packed = w.packed and w.bits == 4
  zero = (jnp.full(w.scale.shape, 2 ** (w.bits - 1), jnp.float32) if w.zero is None
          else w.zero.astype(jnp.float32))
  return _call(x, w.codes, w.scale.astype(jnp.float32), zero, k=k, gs=gs, packed=packed, block_n=block_n,
               interpret=interpret)


@functools.partial(jax.jit, static_argnames=('k', 'gs', 'packed', 'block_n', 'interpret'))
def _call(x, codes, scale, zero, *, k, gs, packed, block_n, interpret):
  m, n = x.shape[0], codes.shape[1]
  bk = _block_k(k, gs)
  per = 2 if packed else 1
  steps = k // bk

  def kernel(x_ref, c_ref, s_ref, z_ref, o_ref):
    def body(i, acc):
      xb = x_ref[:, pl.ds(i * bk, bk)].astype(jnp.float32)                  # [M, bk]
      cb = c_ref[pl.ds(i * (bk // per), bk // per), :]                       # [bk / per, bn] uint8
      if packed:
        q = jnp.stack([cb & 15, cb >> 4], axis=1).reshape(bk, cb.shape[1])   # low nibble first
      else:
        q = cb
      g = (i * bk) // gs
      s = s_ref[pl.ds(g, 1), :]
      z = z_ref[pl.ds(g, 1), :]
      wb = (q.astype(jnp.float32) - z) * s                                   # [bk, bn], this block only
      return acc + jnp.dot(xb, wb, preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32)).astype(o_ref.dtype)

  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
      grid=(n // block_n,),
      in_specs=[pl.BlockSpec((m, k), lambda j: (0, 0)),
                pl.BlockSpec((k // per, block_n), lambda j: (0, j)),
                pl.BlockSpec((scale.shape[0], block_n), lambda j: (0, j)),
                pl.BlockSpec((zero.shape[0], block_n), lambda j: (0, j))],
      out_specs=pl.BlockSpec((m, block_n), lambda j: (0, j)),
      interpret=interpret,
  )(x, codes, scale, zero)


BLOCK_N = 128  # output columns per program of the registered kernel
MAX_ROWS = 64  # x rows up to which the registered kernel is used (the whole x block is loaded per program)


def supports(w, x) -> bool:
  """Whether `quantized_matmul` takes this leaf and input (static: shapes and leaf fields only)."""
  if (not isinstance(w, core.Quantized) or w.fmt != 'int' or w.bits not in (4, 8) or w.scale is None
      or w.g_idx is not None):  # act-order groups: the kernel reads runs of consecutive rows
    return False
  rows = 1
  for d in x.shape[:-1]:
    rows *= d
  k, n = w.shape
  pow2 = lambda v: v > 0 and v & (v - 1) == 0  # Triton blocks are powers of two: x's block is [rows, in]
  return (rows <= MAX_ROWS and (n <= BLOCK_N or n % BLOCK_N == 0) and pow2(k) and pow2(w.scale.shape[0])
          and pow2(min(n, BLOCK_N)))


def linear(x: jax.Array, w: core.Quantized) -> jax.Array:
  """x [..., in] @ w via `quantized_matmul` (x flattened to [M, in], rows padded to a power of two) -> [..., out]."""
  x2 = x.reshape(-1, x.shape[-1])
  m = x2.shape[0]
  padded = 1 << (m - 1).bit_length()
  y = quantized_matmul(jnp.pad(x2, ((0, padded - m), (0, 0))), w, block_n=BLOCK_N)[:m]
  return y.reshape(*x.shape[:-1], w.shape[1])


def enable(backends: tuple[str, ...] = ('gpu', 'tpu')) -> None:
  """Route supported `Quantized` matmuls on `backends` through this kernel (`core.quantized.register_kernel`).
  Until then every backend dequantizes inside jit and runs its dense dot."""
  for backend in backends:
    core.quantized.register_kernel(backend, supports, linear)
