"""QuIP: incoherence processing for 2-3 bit weights (Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit Quantization of
Large Language Models With Guarantees", NeurIPS 2023), with randomized Hadamard transforms as in QuIP#.

Each linear W [in, out] with input Hessian H = XᵀX is multiplied on both sides by random orthogonal matrices
Q_in = D_in·H_in and Q_out = D_out·H_out (H the normalized Walsh–Hadamard matrix of the width, D = diag(±1) drawn
per linear from the run's seed; signs first, QuIP#'s randomized Hadamard transform, so that an input a model
already rotates by H online (QuaRot's down_proj) is not rotated back by a second H), so that no weight and no
Hessian direction stands out (the paper's μ-incoherence):

    W̃ = Q_inᵀ·W·Q_out,   H̃ = Q_inᵀ·H·Q_in      (x·W = (x·Q_in)·W̃·Q_outᵀ)

W̃ is quantized with LDLQ on H̃, which the paper shows is GPTQ (`gptq_from_hessian`; groups and grids as GPTQ's),
and stays so: the leaf `Incoherent(base, in_signs, out_signs)` computes y = ((x·Q_in) @ base)·Q_outᵀ with two fast
Walsh–Hadamard transforms (`core.hadamard_transform`) around the quantized matmul, so the stored weight is the
low-bit one. A width with no Hadamard matrix here uses the largest Hadamard block that divides it (`fallback`).
Block linears only, calibrated true-sequentially as GPTQ (`calibration.run_sequential(..., per_group=True)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import calibration, core, registry
from jaxcompress.core import hadamard
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize
from jaxcompress.quantization._src import common
from jaxcompress.quantization._src.gptq import gptq_from_hessian


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Incoherent(core.Compressed):
  """W = Q_in·base·Q_outᵀ with Q = diag(signs)·H (H the normalized Hadamard of the width, block-diagonal with
  blocks of `in_block` / `out_block` when set). base: [in, out] (a `Quantized` leaf, or dense); in_signs [in],
  out_signs [out]: ±1 float32."""

  base: Any
  in_signs: Any
  out_signs: Any
  in_block: int | None = leaf_lib.static(default=None)
  out_block: int | None = leaf_lib.static(default=None)

  @property
  def shape(self):
    return core.shape_of(self.base)

  @property
  def dtype(self):
    return core.dtype_of(self.base)

  def materialize(self):
    w = core.materialize(self.base).astype(jnp.float32)
    w = hadamard.hadamard_transform(w, axis=-1, block=self.out_block, transpose=True) * self.out_signs[None, :]
    w = hadamard.hadamard_transform(w, axis=0, block=self.in_block, transpose=True)  # Q_in·(base·Q_outᵀ)
    return (self.in_signs[:, None] * w).astype(self.dtype)

  def matmul(self, x):
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32)) * self.in_signs
    z = core.linear(hadamard.hadamard_transform(x32, block=self.in_block).astype(x.dtype), self.base)  # (x·Q_in)·base
    z = hadamard.hadamard_transform(z.astype(x32.dtype), block=self.out_block, transpose=True) * self.out_signs
    return z.astype(x.dtype)

  def stored_params(self):
    return core.stored_params(self.base) + int(np.size(self.in_signs)) + int(np.size(self.out_signs))

  def memory_bytes(self):
    return core.memory_bytes(self.base) + core.memory_bytes(self.in_signs) + core.memory_bytes(self.out_signs)

  def disk_bytes(self):  # the signs as int8 on disk
    return core.disk_bytes(self.base) + int(np.size(self.in_signs)) + int(np.size(self.out_signs))

  def matmul_flops(self):
    return core.matmul_flops(self.base)


def _encode(w: Incoherent, out: serialize.Writer) -> dict:
  out.put('.in_signs', np.asarray(w.in_signs, np.int8))
  out.put('.out_signs', np.asarray(w.out_signs, np.int8))
  return {'base': out.weight('.base', w.base), 'in_block': w.in_block, 'out_block': w.out_block, 'signs': 'first'}


def _decode(desc: dict, src: serialize.Reader) -> Incoherent:
  if desc.get('signs') != 'first':
    raise ValueError('an Incoherent (QuIP) leaf written by an earlier jaxcompress, whose transform applied the '
                     'Hadamard before the signs (Q = H·D; now Q = D·H): its base would be read against the other '
                     'transform. Run quip again on the uncompressed model.')
  signs = lambda k: jnp.asarray(np.asarray(src.get(k), np.float32))
  return Incoherent(src.weight('.base', desc['base']), signs('.in_signs'), signs('.out_signs'),
                    in_block=desc['in_block'], out_block=desc['out_block'])


serialize.register('incoherent', Incoherent, _encode, _decode)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuIPConfig:
  bits: int = registry.field(2, range='[2, 8]')  # weight bits (2..8; the paper's point is 2 and 3)
  # rows per scale of the transformed weight (divides every kernel's input dimension), None: per channel
  group_size: int | None = registry.field(128, range='[1, inf)')
  symmetric: bool = False  # symmetric grid instead of GPTQ's asymmetric min-max one
  damp: float = registry.field(0.01, range='(0, inf)')  # fraction of mean(diag H̃) added to its diagonal
  fallback: str = 'block'  # a width with no Hadamard matrix: 'block' (the largest block dividing it) or 'error'
  rules: core.Rules = core.Rules()  # which block linears are quantized (recipe: include=, exclude=)

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'quip')
    if self.fallback not in ('block', 'error'):
      raise ValueError(f"quip: fallback={self.fallback!r}; choose 'block' or 'error'.")


def _block(n: int, what: str, fallback: str) -> int | None:
  if hadamard.supported(n):
    return None
  b = hadamard.largest_block(n)
  if fallback == 'block' and b > 1:
    return b
  raise ValueError(f'quip: {what} width {n} has no Hadamard matrix here' + (
      f"; fallback='block' uses blocks of {b}." if b > 1 else ' and no Hadamard block divides it.'))


def quip_layer(w: jax.Array, h: jax.Array, key: jax.Array, config: QuIPConfig = QuIPConfig()) -> Incoherent:
  """QuIP of one linear: w [in, out], h = XᵀX [in, in], key: the linear's signs -> `Incoherent(Quantized)`."""
  w, h = jnp.asarray(w), jnp.asarray(h)
  if w.ndim != 2 or h.shape != (w.shape[0],) * 2:
    raise ValueError(f'quip: expected w [in, out] and h [in, in]; got {w.shape} and {h.shape}.')
  common.check_finite(w, 'w', 'quip')
  common.check_finite(h, 'the Hessian (calibration inputs)', 'quip')
  n_in, n_out = w.shape
  bi, bo = _block(n_in, 'input', config.fallback), _block(n_out, 'output', config.fallback)
  k_in, k_out = jax.random.split(key)
  s_in = jax.random.rademacher(k_in, (n_in,), jnp.float32)
  s_out = jax.random.rademacher(k_out, (n_out,), jnp.float32)
  wf = w.astype(jnp.float32)
  wt = hadamard.hadamard_transform(hadamard.hadamard_transform(s_in[:, None] * wf * s_out[None, :], axis=0,
                                                                block=bi), axis=-1, block=bo)  # Q_inᵀ·W·Q_out
  hf = s_in[:, None] * h.astype(jnp.float32) * s_in[None, :]
  ht = hadamard.hadamard_transform(hadamard.hadamard_transform(hf, axis=0, block=bi), axis=-1, block=bi)  # Q_inᵀ·H·Q_in
  q = gptq_from_hessian(wt.astype(w.dtype), ht, bits=config.bits, group_size=config.group_size,
                        symmetric=config.symmetric, damp=config.damp)
  return Incoherent(q, s_in, s_out, in_block=bi, out_block=bo)


def quip(model, params, calib, *, config: QuIPConfig = QuIPConfig(), offload: bool = False):
  """QuIP of every block linear `config.rules` choose, true-sequentially as GPTQ. calib: a `registry.Context` or a
  list of calibration batches; its seed draws every linear's signs (fold_in of its place in the model). Returns
  (model, params with `Incoherent(Quantized)` kernels)."""
  ctx = registry.as_context(calib)
  key = ctx.key('quip')
  check(model, params, config=config)

  def compress_block(i, block, stats):
    order = [k for g in model.block_structure(block) for k in g.kernels]  # each linear's signs: its place
    return core.paths.replace(block, {p: quip_layer(core.paths.get(block, p), st['xtx'],
                                                    jax.random.fold_in(key, i * len(order) + order.index(p)), config)
                                      for p, st in stats.items()})

  compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                    caller='quip')
  params, _ = calibration.run_sequential(model, params, ctx.batches(), calibration.hessian(), compress_block,
                                         per_group=True, keep_stats=False, offload=offload)
  return model, params


def check(model, params, *, config: QuIPConfig) -> None:
  """2-D kernels with Hadamard widths (or blocks), a group size dividing each chosen kernel's input dimension."""
  for i, k, shape in common.chosen_2d(model, params, config.rules, 'quip'):
    common.check_group_size(config.group_size, shape[0], f'quip: block {i} {k}')
    _block(shape[0], f'block {i} {k} input', config.fallback)
    _block(shape[1], f'block {i} {k} output', config.fallback)


registry.register('quip', QuIPConfig, quip, family='quantization', forbids=registry.COMPRESSED, adds='quantized',
                  calibrated=True, check=check,
                  paper='Chee et al., "QuIP: 2-Bit Quantization of Large Language Models With Guarantees" '
                  '(NeurIPS 2023)')
