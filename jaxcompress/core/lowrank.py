"""`LowRank`: a weight stored as the product of two thin factors, W ≈ A·B."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize


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
    if not all(hasattr(f, 'shape') for f in (self.a, self.b)):
      return  # tree utilities rebuild leaves with None or sentinel children
    sa, sb = leaf_lib.shape_of(self.a), leaf_lib.shape_of(self.b)
    if not sa and not sb:
      return  # tree utilities also rebuild leaves with reduced children (norms, sums)
    # Stacked factors [L, in, rank] / [L, rank, out] (scan over blocks) are checked per slice.
    if len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
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
    from jaxcompress.core.matmul import linear  # linear dispatches on the factors' kinds
    return linear(linear(x, self.a), self.b)

  def stored_params(self):
    return leaf_lib.stored_params(self.a) + leaf_lib.stored_params(self.b)

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.a) + leaf_lib.memory_bytes(self.b)

  def disk_bytes(self):
    return leaf_lib.disk_bytes(self.a) + leaf_lib.disk_bytes(self.b)

  def matmul_flops(self):
    return leaf_lib.matmul_flops(self.a) + leaf_lib.matmul_flops(self.b)


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class LoRA(leaf_lib.Compressed):
  """W = base + scale · lora_a @ lora_b: a frozen base with a trainable low-rank adapter (Hu et al., 2021).

  base: [in, out], dense or compressed (a `Quantized` base is QLoRA); lora_a: [in, r]; lora_b: [r, out].
  scale: alpha / r, static.
  """

  base: leaf_lib.Weight
  lora_a: leaf_lib.Weight
  lora_b: leaf_lib.Weight
  scale: float = leaf_lib.static(default=1.0)

  @property
  def rank(self) -> int:
    return leaf_lib.shape_of(self.lora_a)[1]

  @property
  def shape(self):
    return leaf_lib.shape_of(self.base)

  @property
  def dtype(self):
    return leaf_lib.dtype_of(self.lora_a)

  def materialize(self):
    delta = leaf_lib.materialize(self.lora_a) @ leaf_lib.materialize(self.lora_b)
    return (leaf_lib.materialize(self.base).astype(delta.dtype) + self.scale * delta)

  def matmul(self, x: jax.Array) -> jax.Array:
    from jaxcompress.core.matmul import linear
    return linear(x, self.base) + self.scale * linear(linear(x, self.lora_a), self.lora_b)

  def stored_params(self):
    return sum(leaf_lib.stored_params(w) for w in (self.base, self.lora_a, self.lora_b))

  def memory_bytes(self):
    return sum(leaf_lib.memory_bytes(w) for w in (self.base, self.lora_a, self.lora_b))

  def disk_bytes(self):
    return sum(leaf_lib.disk_bytes(w) for w in (self.base, self.lora_a, self.lora_b))

  def matmul_flops(self):
    return sum(leaf_lib.matmul_flops(w) for w in (self.base, self.lora_a, self.lora_b))


serialize.register(
    'lowrank', LowRank,
    lambda w, out: {'a': out.weight('.a', w.a), 'b': out.weight('.b', w.b)},
    lambda desc, src: LowRank(a=src.weight('.a', desc['a']), b=src.weight('.b', desc['b'])))
serialize.register(
    'lora', LoRA,
    lambda w, out: {'scale': w.scale, 'base': out.weight('.base', w.base),
                    'lora_a': out.weight('.lora_a', w.lora_a), 'lora_b': out.weight('.lora_b', w.lora_b)},
    lambda desc, src: LoRA(base=src.weight('.base', desc['base']), lora_a=src.weight('.lora_a', desc['lora_a']),
                           lora_b=src.weight('.lora_b', desc['lora_b']), scale=desc['scale']))
