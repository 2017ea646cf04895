"""Mixed precision: per-layer bit widths from measured sensitivity under a model-size budget.

Sensitivity of layer l at b bits: its output error E_l(b) = tr(Δᵀ H Δ) / tokens with Δ = W − RTN_b(W) and
H = XᵀX from the full-precision model's calibration inputs (the squared error the layer adds to its output,
summed over output features). Allocation is greedy on the marginal gain: every layer starts at the fewest
candidate bits; the upgrade to a layer's next candidate width with the largest error drop per added bit of
storage is taken while the average stays within `average_bits` (code bits per weight, weighted by layer size;
scales not counted). Then every layer is quantized with GPTQ at its width, true-sequentially.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress import calibration, core, registry
from jaxcompress.quantization._src import common, quantizers
from jaxcompress.quantization._src.gptq import gptq_from_hessian


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedConfig:
  average_bits: float = registry.field(3.5, range='[2, 8]')  # mean code bits over all block kernels
  candidates: tuple[int, ...] = (2, 3, 4, 8)  # widths a kernel may get
  group_size: int | None = registry.field(128, range='[1, inf)')  # GPTQ rows per scale
  damp: float = 0.01  # GPTQ damping
  # which block linears are quantized (recipe: include=, exclude=); average_bits is over these
  rules: core.Rules = core.Rules()

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'mixed')


def sensitivity(w: jax.Array, h: jax.Array, count, bits: int, group_size: int | None) -> float:
  """E(b) = tr(Δᵀ H Δ) / count for the round-to-nearest weight at `bits`. w: [in, out]; h: [in, in]."""
  d = quantizers.quantize_weight(w, bits=bits, group_size=group_size).materialize().astype(jnp.float32) - w
  return float(jnp.sum(d * (h @ d)) / jnp.maximum(count, 1))


def allocate(errors: dict[str, dict[int, float]], sizes: dict[str, int], average_bits: float) -> dict[str, int]:
  """Greedy allocation. errors: {layer: {bits: error}}; sizes: {layer: weights}; -> {layer: bits}.

  The average code bits Σ bits_l · size_l / Σ size_l never exceeds `average_bits`.
  """
  cands = {p: sorted(e) for p, e in errors.items()}
  bits = {p: c[0] for p, c in cands.items()}
  total = sum(sizes.values())
  used = sum(bits[p] * sizes[p] for p in bits)
  if used > average_bits * total:
    raise ValueError(f'allocate: average_bits={average_bits} is below {used / total:.3f}, the average with every '
                     'layer at its fewest candidate bits; raise it or add a narrower candidate.')
  while True:
    best, gain = None, 0.0
    for p, c in cands.items():
      i = c.index(bits[p])
      if i + 1 == len(c):
        continue
      extra = (c[i + 1] - bits[p]) * sizes[p]
      if used + extra > average_bits * total:
        continue
      g = (errors[p][bits[p]] - errors[p][c[i + 1]]) / extra
      if best is None or g > gain:
        best, gain = p, g
    if best is None:
      return bits
    c = cands[best]
    nxt = c[c.index(bits[best]) + 1]
    used += (nxt - bits[best]) * sizes[best]
    bits[best] = nxt


def bit_allocation(model, params, calib, *, config: MixedConfig = MixedConfig()) -> dict[str, int]:
  """{block kernel path: bits} of the kernels `config.rules` choose: each kernel's round-to-nearest sensitivity
  at every candidate width, measured on the full-precision model's calibration inputs, then `allocate` under
  config.average_bits. calib: a `registry.Context` or a list of calibration batches."""
  batches = registry.as_context(calib).batches()
  stats = calibration.calibrate(model, params, batches, calibration.hessian(), head=False)
  keep = calibration.chosen(model, params, model.selection_rules(config.rules), caller='mixed')
  errors, sizes = {}, {}
  for p, st in ((p, st) for p, st in stats.items() if p in keep):
    w = jnp.asarray(core.paths.get(params, p), jnp.float32)
    errors[p] = {b: sensitivity(w, st['xtx'], st['count'], b, config.group_size) for b in config.candidates}
    sizes[p] = int(w.size)
  return allocate(errors, sizes, config.average_bits)


def mixed(model, params, calib, *, config: MixedConfig = MixedConfig(), widths: dict[str, int] | None = None):
  """Every block linear `config.rules` choose GPTQ-quantized at its allocated width, true-sequentially. calib: a
  `registry.Context` or a list of calibration batches; widths: {kernel path: bits} (what `bit_allocation`
  returns; None: computed here). Returns (model, params)."""
  batches = registry.as_context(calib).batches()
  bits = bit_allocation(model, params, batches, config=config) if widths is None else widths

  def compress_block(i, block, st):
    return core.paths.replace(block, {
        k: gptq_from_hessian(core.paths.get(block, k), s['xtx'], bits=bits[f'{model.block_path}/{i}/{k}'],
                             group_size=config.group_size, damp=config.damp)
        for k, s in st.items()})

  compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                    caller='mixed')
  params, _ = calibration.run_sequential(model, params, batches, calibration.hessian(), compress_block,
                                         per_group=True, keep_stats=False)
  return model, params


registry.register('mixed', MixedConfig, mixed, family='quantization', forbids=registry.COMPRESSED, adds='quantized',
                  calibrated=True, check=common.check_block_group_size,
                  paper='per-layer widths from measured GPTQ sensitivity (HAWQ-style allocation, '
                  'Dong et al., ICCV 2019)')
