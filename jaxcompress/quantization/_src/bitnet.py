"""Ternary (1.58-bit) weights trained quantization-aware, BitNet b1.58's quantizer (Ma et al., "The Era of 1-bit
LLMs: All Large Language Models are in 1.58 Bits", 2024).

Every selected kernel is replaced in the forward pass by its absmean ternarization, with the gradient passed
straight through to the float weight:

    γ = mean |W|                       (over the whole kernel, or per output column with per_column=True)
    W̃ = γ · clip(round(W / (γ + ε)), −1, 1)

and, with `act_bits`, each such linear's input rounded per token to an absmax grid (the paper's 8 bits). The
trained weights then become `core.Quantized` 2-bit leaves on the symmetric grid (codes 1, 2, 3 for −γ, 0, +γ;
scale γ per column), which compute exactly what the last training forward computed. Training distils the
uncompressed model (`train.recovery.kd_objective`: soft KL for causal LMs, the embeddings for encoders).

    model, params = quantization.bitnet(model, params, ctx, config=quantization.BitNetConfig(steps=200))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxcompress import core, registry
from jaxcompress.quantization._src import common
from jaxcompress.core.activations import ActQuantized, straight_through
from jaxcompress.train import recovery, transforms

EPS = 1e-5  # the paper's ε in W / (γ + ε)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class BitNetConfig:
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps with the ternary forward
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  per_column: bool = False  # γ per output column instead of one per kernel (the paper's)
  act_bits: int | None = registry.field(None, range='[2, 16]')  # also round each input per token (paper: 8)
  rules: core.Rules = core.Rules()  # which kernels become ternary (recipe: include=, exclude=, head=)

  def __post_init__(self):
    if self.rules.embeddings:
      raise ValueError('embeddings=True: ternary weights are a linear\'s kernel (a scale per column); quantize '
                       'the embedding tables with rtn(include=(), embeddings=True).')


def absmean_scale(w: jax.Array, per_column: bool = False) -> jax.Array:
  """γ = mean |W| as [1, out] float32 (one value repeated, or one per output column)."""
  a = jnp.abs(w.astype(jnp.float32))
  gamma = jnp.mean(a, axis=0, keepdims=True) if per_column else jnp.full((1, w.shape[-1]), jnp.mean(a))
  return gamma


def ternary_codes(w: jax.Array, per_column: bool = False) -> tuple[jax.Array, jax.Array]:
  """(t [in, out] float32 in {−1, 0, 1}, γ [1, out] float32) of a kernel w [in, out]."""
  gamma = absmean_scale(w, per_column)
  return jnp.clip(jnp.round(w.astype(jnp.float32) / (gamma + EPS)), -1, 1), gamma


def ternarize(w: jax.Array, per_column: bool = False) -> jax.Array:
  """γ · clip(round(W / (γ + ε)), −1, 1) in w's dtype (the forward value; no gradient rule)."""
  t, gamma = ternary_codes(w, per_column)
  return (t * gamma).astype(w.dtype)


def to_quantized(w: jax.Array, per_column: bool = False) -> core.Quantized:
  """The ternarized kernel as a 2-bit symmetric `core.Quantized` leaf: codes t + 2, scale γ per column."""
  t, gamma = ternary_codes(w, per_column)
  return common.make_leaf((t + 2).astype(jnp.uint8), gamma, None, bits=2, group_size=None, shape=tuple(w.shape),
                          scale_dtype=w.dtype)


def ternary_transform(rules: core.Rules, *, per_column: bool = False,
                      act_bits: int | None = None) -> transforms.Transform:
  """A stateless Transform: the kernels `rules` choose ternarized in the forward pass (straight-through), their
  inputs rounded per token to act_bits when given."""
  fake = straight_through(functools.partial(ternarize, per_column=per_column))

  def one(w):
    if core.is_compressed(w):
      raise TypeError(f'bitnet: cannot ternarize a {type(w).__name__} weight; select dense kernels.')
    return fake(w) if act_bits is None else ActQuantized(fake(w), bits=act_bits)

  return transforms.Transform(forward=lambda params, state: core.select_by(params, rules).map(
      lambda _, w: one(w), params))


def bitnet(model, params, calib, *, config: BitNetConfig = BitNetConfig()):
  """Trains the kernels `config.rules` choose (default: the blocks') under their ternary forward for
  config.steps on calib.train, distilling calib.reference_model, then makes them 2-bit `core.Quantized` leaves
  (wrapped in `ActQuantized` with act_bits). calib: a `registry.Context` with training batches and the
  reference model. Returns (model, params)."""
  ctx = registry.as_context(calib)
  rules = model.selection_rules(config.rules)
  if not len(core.select_by(params, rules)):
    raise ValueError(f'bitnet: include={config.rules.include!r} exclude={config.rules.exclude!r} choose no '
                     'kernel; see model.select(params) for the paths.')
  fake = ternary_transform(rules, per_column=config.per_column, act_bits=config.act_bits)
  trained = recovery.fit(ctx, 'bitnet', model, params, recovery.kd_objective(model, ctx), steps=config.steps,
                         learning_rate=config.learning_rate, transforms=[fake])

  @jax.jit
  def finalize(p):
    act = (lambda w: w) if config.act_bits is None else (lambda w: ActQuantized(w, bits=config.act_bits))
    return core.select_by(p, rules).map(lambda _, w: act(to_quantized(w, config.per_column)), p)

  return model, finalize(trained)


registry.register('bitnet', BitNetConfig, bitnet, family='quantization', forbids=registry.COMPRESSED,
                  adds='quantized', trains=True,
                  paper='Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (2024): '
                  'BitNet b1.58\'s absmean ternary weights, trained quantization-aware by distillation')
