"""Mixed precision: per-layer bit widths from measured sensitivity under a model-size budget.

Sensitivity of layer l at b bits: its output error E_l(b) = tr(Δᵀ H Δ) / tokens with Δ = W − RTN_b(W) and
H = XᵀX from the full-precision model's calibration inputs (the squared error the layer adds to its output,
summed over output features). Allocation is greedy on the marginal gain: every layer starts at the fewest
candidate bits; the upgrade to a layer's next candidate width with the largest error drop per added bit of
storage is taken while the average stays within `average_bits` (code bits per weight, weighted by layer size;
scales not counted). Then every layer is quantized with GPTQ at its width, true-sequentially.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress import calibration, core
from jaxcompress.quantization.gptq import gptq_from_hessian
from jaxcompress.quantization import quantizers


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


def mixed_precision(model, params, batches, *, average_bits: float = 3.5, candidates: tuple[int, ...] = (2, 3, 4, 8),
                    group_size: int | None = 128, damp: float = 0.01):
  """(params with every block linear GPTQ-quantized at its allocated width, {kernel path: bits})."""
  stats = calibration.calibrate(model, params, batches, calibration.hessian(), head=False)
  errors, sizes = {}, {}
  for p, st in stats.items():
    w = jnp.asarray(core.paths.get(params, p), jnp.float32)
    errors[p] = {b: sensitivity(w, st['xtx'], st['count'], b, group_size) for b in candidates}
    sizes[p] = int(w.size)
  bits = allocate(errors, sizes, average_bits)

  def compress_block(i, block, st):
    return core.paths.replace(block, {
        k: gptq_from_hessian(core.paths.get(block, k), s['xtx'], bits=bits[f'{model.block_path}/{i}/{k}'],
                                      group_size=group_size, damp=damp)
        for k, s in st.items()})

  params, _ = calibration.run_sequential(model, params, batches, calibration.hessian(), compress_block,
                                         per_group=True, keep_stats=False)
  return params, bits
