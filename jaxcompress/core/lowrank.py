"""`LowRank`: a weight stored as the product of two thin factors, W ≈ A·B."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress.core import leaf as leaf_lib


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class LowRank(leaf_lib.Compressed):
  """W = a @ b.

  a: [in, rank], b: [rank, out]; either may itself be compressed (e.g. `Quantized` factors).
  `matmul` applies the factors one after the other, so a rank-r layer really does 2·r·(in+out) FLOPs a row.
  """

  a: leaf_lib.Weight
  b: leaf_lib.Weight

  def __post_init__(self):
    sa, sb = leaf_lib.shape_of(self.a), leaf_lib.shape_of(self.b)
    if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
      raise ValueError(f'LowRank: factors must be a [in, rank] and b [rank, out]; got a {sa}, b {sb}.')

  @property
  def rank(self) -> int:
    return leaf_lib.shape_of(self.a)[1]

  @property
  def shape(self):
    return (leaf_lib.shape_of(self.a)[0], leaf_lib.shape_of(self.b)[1])

  @property
  def dtype(self):
    return jnp.result_type(leaf_lib.dtype_of(self.a), leaf_lib.dtype_of(self.b))

  def materialize(self):
    return leaf_lib.materialize(self.a) @ leaf_lib.materialize(self.b)

  def matmul(self, x: jax.Array) -> jax.Array:
    from jaxcompress.core.linear import linear  # linear dispatches on the factors' kinds
    return linear(linear(x, self.a), self.b)

  def stored_params(self):
    return leaf_lib.stored_params(self.a) + leaf_lib.stored_params(self.b)

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.a) + leaf_lib.memory_bytes(self.b)

  def disk_bytes(self):
    return leaf_lib.disk_bytes(self.a) + leaf_lib.disk_bytes(self.b)

  def matmul_flops(self):
    return leaf_lib.matmul_flops(self.a) + leaf_lib.matmul_flops(self.b)
