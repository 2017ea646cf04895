"""The one matmul every model layer calls: dense, masked, quantized, low-rank and composed weights alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.core import leaf as leaf_lib


def linear(x: jax.Array, w: leaf_lib.Weight, bias: leaf_lib.Weight | None = None) -> jax.Array:
  """x: [..., in] @ w: [in, out] (+ bias: [out]) -> [..., out], computed in x's dtype.

  Compressed weights supply their own `matmul`: `LowRank` runs two thin matmuls, the others form the dense
  weight on the fly.
  """
  w_shape = leaf_lib.shape_of(w)
  if len(w_shape) != 2 or x.shape[-1] != w_shape[0]:
    raise ValueError(f'linear: input [..., {x.shape[-1]}] does not match weight {w_shape} ([in, out]).')
  if leaf_lib.is_compressed(w):
    y = w.matmul(x)
  else:
    y = jnp.matmul(x, w.astype(x.dtype))
  if bias is not None:
    y = y + leaf_lib.materialize(bias).astype(y.dtype)
  return y


def embedding_lookup(table: leaf_lib.Weight, ids: jax.Array, dtype=None) -> jax.Array:
  """table: [vocab, d], ids: [...] int -> [..., d]. Ids outside [0, vocab) give NaN rows (they cannot be
  checked under jit; data pipelines check them on the host)."""
  dense = leaf_lib.materialize(table)
  out = jnp.take(dense, ids, axis=0)
  return out if dtype is None else out.astype(dtype)


def linear_transposed(x: jax.Array, table: leaf_lib.Weight) -> jax.Array:
  """x: [..., d] @ table.T where table is [vocab, d] (a head tied to the embedding) -> [..., vocab]."""
  return jnp.matmul(x, leaf_lib.materialize(table).astype(x.dtype).T)
