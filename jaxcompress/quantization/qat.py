"""Quantization-aware training: selected kernels are fake-quantized in the forward pass of every step.

The forward uses round-to-nearest quantized weights; the backward treats the rounding as the identity (the
straight-through estimator), so the float32 master weights learn to sit well on the quantization grid.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxcompress import core
from jaxcompress.train import transforms


def straight_through(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """w -> fn(w) in the forward pass, identity in the backward pass: d fn(w) / dw := 1."""
  return lambda w: w + jax.lax.stop_gradient(fn(w) - w)


def fake_quant(rules: core.Rules = core.Rules(), *, bits: int = 4, group_size: int | None = 128,
               symmetric: bool = False, fmt: str = 'int') -> transforms.Transform:
  """A stateless Transform whose forward round-to-nearest quantizes the selected kernels (straight-through).

  rules: which kernels (`core.Rules`, default every block kernel); bits, group_size, symmetric, fmt: as in
  `core.quantize`. `Masked` kernels are quantized under their mask; other compressed kinds are refused.
  """
  q = straight_through(lambda w: core.fake_quantize(w, bits=bits, group_size=group_size, symmetric=symmetric,
                                                    fmt=fmt, pack=False))

  def on_weight(w):
    if isinstance(w, core.Masked):
      return core.Masked(on_weight(w.value), w.mask)
    if core.is_compressed(w):
      raise TypeError(f'fake_quant: cannot fake-quantize a {type(w).__name__} weight; select dense or Masked ones.')
    return q(w)

  def forward(params, state):
    del state
    return core.select_by(params, rules).map(lambda _, w: on_weight(w), params)

  return transforms.Transform(forward=forward)
