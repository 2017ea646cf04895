"""Learned step size quantization (LSQ, Esser et al., ICLR 2020) for quantization-aware training.

The step sizes are trained with the weights, so they live in the parameters: `add_lsq` replaces each selected
kernel by an `LSQWeight(w, log_step)` leaf (log_step [1, out], one step per output column, kept as a log so it
stays positive). Its forward is symmetric fake quantization with the straight-through estimator on the rounding

    v = clip(w / s, −Qn, Qp);   ŵ = (v + stop_grad(round(v) − v)) · s      Qn = 2^(b−1), Qp = 2^(b−1) − 1

whose gradient in s is LSQ's: round(v) − v inside the range, −Qn or Qp outside; the step's gradient is
scaled by g = 1 / sqrt(N_out · Qp) (the paper's gradient scale, N_out = weights per step). `finalize` turns the
trained leaves into `core.Quantized` ones with the learned steps as scales (bit-identical forward).

The method `lsq` trains every block kernel so on the model's own loss, then finalizes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.quantization._src import common
from jaxcompress.train import recovery


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class LSQWeight(core.Compressed):
  """A kernel w [in, out] fake-quantized with learned per-column steps exp(log_step) [1, out]."""

  w: jax.Array
  log_step: jax.Array
  bits: int = leaf_lib.static(default=4)

  @property
  def shape(self):
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return np.dtype(self.w.dtype)

  def materialize(self):
    qn, qp = 2 ** (self.bits - 1), 2 ** (self.bits - 1) - 1
    g = 1.0 / math.sqrt(self.w.shape[0] * qp)
    ls = self.log_step.astype(jnp.float32)
    ls = ls + (g - 1.0) * (ls - jax.lax.stop_gradient(ls))  # value exactly ls, gradient scaled by g
    s = jnp.exp(ls)
    v = jnp.clip(self.w.astype(jnp.float32) / s, -qn, qp)
    v = v + jax.lax.stop_gradient(jnp.round(v) - v)
    return (v * s).astype(self.w.dtype)

  def stored_params(self):
    return self.size + int(np.size(self.log_step))

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.w) + leaf_lib.memory_bytes(self.log_step)

  def disk_bytes(self):
    return self.memory_bytes()

  def matmul_flops(self):
    return 2 * self.size


def add_lsq(params, rules: core.Rules = core.Rules(), *, bits: int = 4):
  """Selected kernels -> `LSQWeight`s with the paper's initial step 2·mean|w| / sqrt(Qp) per column."""
  common.check_bits(bits, 'add_lsq')
  qp = 2 ** (bits - 1) - 1

  def wrap(_, w):
    if core.is_compressed(w):
      raise TypeError(f'add_lsq: cannot wrap a {type(w).__name__} weight; select dense kernels.')
    common.check_finite(w, 'w', 'add_lsq')
    step = 2 * jnp.mean(jnp.abs(jnp.asarray(w, jnp.float32)), axis=0, keepdims=True) / math.sqrt(qp)
    return LSQWeight(jnp.asarray(w), jnp.log(jnp.maximum(step, 1e-8)), bits=bits)

  return core.select_by(params, rules).map(wrap, params)


def finalize(params):
  """Every `LSQWeight` -> `core.Quantized` (symmetric, per column, scale = the learned step)."""
  def convert(x):
    if not isinstance(x, LSQWeight):
      return x
    qn, qp = 2 ** (x.bits - 1), 2 ** (x.bits - 1) - 1
    s = jnp.exp(x.log_step.astype(jnp.float32))
    q = jnp.clip(jnp.round(jnp.clip(x.w.astype(jnp.float32) / s, -qn, qp)), -qn, qp) + qn
    return common.make_leaf(q.astype(jnp.uint8), s.astype(x.w.dtype), None, bits=x.bits, group_size=None,
                            shape=x.shape, scale_dtype=x.w.dtype)
  return jax.tree.map(convert, params, is_leaf=lambda x: isinstance(x, LSQWeight))


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class LSQConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8); symmetric, one learned step per output column
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps training weights and steps together
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  rules: core.Rules = core.Rules()  # which kernels learn their steps (recipe: include=, exclude=, head=)

  def __post_init__(self):
    if self.rules.embeddings:
      raise ValueError('embeddings=True: an LSQ weight is a linear (a learned step per output column), not a '
                       'lookup table; quantize the embeddings with rtn(include=(), embeddings=True).')


def lsq(model, params, calib, *, config: LSQConfig = LSQConfig()):
  """Every kernel `config.rules` choose (default: the blocks') as an `LSQWeight` trained with its steps on the model's own loss (encoders: KD of the
  embeddings from calib.reference_model), then `finalize`d into `core.Quantized`. `core.Masked` kernels train
  their kept values under the mask. calib: a `registry.Context` with training batches. Returns (model, params)."""
  ctx = registry.as_context(calib)
  dense, masks = common.unmask(params)
  sel = core.select_by(dense, model.selection_rules(config.rules))
  if not len(sel):
    raise ValueError(f'lsq: include={config.rules.include!r} exclude={config.rules.exclude!r} choose no kernel; '
                     'see model.select(params) for the paths.')
  wrapped = common.remask(add_lsq(dense, model.selection_rules(config.rules), bits=config.bits), masks)
  trained = recovery.fit(ctx, 'lsq', model, wrapped, recovery.task_objective(model, ctx), steps=config.steps,
                         learning_rate=config.learning_rate, teacher=not model.causal)
  return model, jax.jit(finalize)(trained)


registry.register('lsq', LSQConfig, lsq, family='quantization', forbids=common.DENSE_OR_MASKED, adds='quantized',
                  trains=True, paper='Esser et al., "Learned Step Size Quantization" (ICLR 2020)')
