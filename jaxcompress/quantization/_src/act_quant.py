"""Per-token dynamic activation quantization: W4A8 and W4A4 after any weight quantizer (QuaRot, Ashkboos et al.,
NeurIPS 2024, §4: activations rounded per token at run time, on the rotated model).

Each chosen linear becomes an `ActQuantized` leaf around its weight (dense, Masked or Quantized, kept as it is),
whose matmul rounds the input per token to a symmetric `bits`-bit grid before multiplying:

    s[t] = max_j |x[t, j]| / (2^(bits-1) − 1),    x̂[t, j] = s[t] · clip(round(x[t, j] / s[t]), ±(2^(bits-1) − 1))

(`grid='narrow'`, the papers'). `grid='full'` rounds to [−2^(bits-1), 2^(bits-1) − 1] with s[t] = max|x[t]| /
((2^bits − 1) / 2), as compressed-tensors and vLLM do: an int W8A8 model written with `compressed_tensors.export`
computes the same numbers in transformers only on that grid. `grid='fp8'` (bits=8) rounds to float8_e4m3fn values
with s[t] = max|x[t]| / 448: FP8 W8A8 after `rtn(fmt='fp8')`, compressed-tensors' 'float-quantized'.

With `static=True` one scale per linear input (and a zero point with `symmetric=False`) is calibrated instead:
the range of that input over the calibration batches (`calibration.min_max()`, the model calibrated group by group
as it is being quantized, so each linear sees the rounding of those before it), turned into a grid by
`core.activations.static_qparams`. This is compressed-tensors' static per-tensor `input_scale` (llm-compressor's
FP8 and static int8 W8A8 schemes): no per-token maximum at run time, at the price of rounding every token on one
grid.

With `symmetric=False` (int grids) each token's own range [min, max] sets its scale and an integer zero point
(compressed-tensors' dynamic asymmetric `token` scheme, vLLM's AZP int8 inputs): a token whose values are mostly
of one sign (after a SiLU, say) uses the whole grid instead of half of it. With `group_size=g` each run of g
consecutive input channels of a token gets its own scale (and zero point): compressed-tensors' dynamic `group`
activations, where an outlier channel coarsens the grid of its group only.

By default the scale is computed from each token on the fly (dynamic), so no calibration is needed. Around a QuIP
`Incoherent` leaf the rounding goes inside, on the input its quantized weight multiplies (after QuIP's randomized
Hadamard), where no outlier channel sets the scale. One outlier channel sets
every token's scale, which is why 4-bit activations need the rotations of `quarot` first (with `online=True` for
the MLP's down_proj input, which no fused rotation reaches).

    quarot(online=True) > gptq(bits=4, group_size=128) > act_quant(bits=4)                  # W4A4, a recipe
    rtn(fmt='fp8', group_size=None) > act_quant(grid='fp8', static=True)                      # FP8 static
    model, params = quantization.act_quant(model, params, config=quantization.ActQuantConfig(bits=8))
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxcompress import calibration, core, registry
from jaxcompress.core.activations import ActQuantized, static_qparams
from jaxcompress.quantization._src.quip import Incoherent
from jaxcompress.quantization._src.rtn import selection
from jaxcompress.quantization._src.w8a8 import Int8Linear


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActQuantConfig:
  bits: int = registry.field(8, range='[2, 16]')  # activation bits
  # 'narrow': ±(2^(bits-1) − 1); 'full': [−2^(bits-1), 2^(bits-1) − 1] (compressed-tensors'); 'fp8': e4m3 values
  grid: str = 'narrow'
  rules: core.Rules = core.Rules()  # which linears (recipe: include=, exclude=, head=); default the blocks'
  static: bool = False  # one calibrated scale per linear input (compressed-tensors' input_scale); False: per token
  symmetric: bool = True  # False (int grids): a zero point too (per token, or calibrated with static=True)
  # dynamic only: one scale per group_size consecutive input channels of a token (divides every chosen input width)
  group_size: int | None = registry.field(None, range='[1, inf)')

  def __post_init__(self):
    core.activations.check_grid(self.grid, 'act_quant', self.bits)
    if self.rules.embeddings:
      raise ValueError('embeddings=True: an embedding lookup has no input activation to round; choose linears.')
    if not self.symmetric and self.grid == 'fp8':
      raise ValueError("act_quant: symmetric=False needs an int grid ('narrow' or 'full'), not grid='fp8': FP8 "
                       'scales are absmax; give symmetric=True.')
    if self.static and self.group_size is not None:
      raise ValueError(f'act_quant: group_size={self.group_size} needs static=False: static scales are one per '
                       'tensor (per-group scales are computed per token at run time).')
    if self.static:
      calibration.check_blocks_only(self.rules, 'act_quant(static=True)')


def _wrap(bits: int, grid: str, symmetric: bool, group_size: int | None):
  def one(path, w):
    if isinstance(w, Incoherent):  # round what the quantized weight multiplies: the input after QuIP's transform
      return dataclasses.replace(w, base=one(path, w.base))
    if isinstance(w, (ActQuantized, Int8Linear)):
      raise ValueError(f'act_quant: {path} already rounds its input ({type(w).__name__}); quantize activations '
                       'once.')
    if group_size is not None and core.shape_of(w)[0] % group_size:
      raise ValueError(f'act_quant: group_size={group_size} does not divide {path}\'s input width '
                       f'{core.shape_of(w)[0]}; choose a divisor, or exclude= that linear.')
    return ActQuantized(w, bits=bits, grid=grid, symmetric=symmetric, group_size=group_size)
  return one


def act_quant(model, params, calib=None, *, config: ActQuantConfig = ActQuantConfig()):
  """Every linear config.rules choose wrapped in `ActQuantized(w, bits=config.bits, grid=config.grid)`. calib (a
  `registry.Context` or a list of calibration batches) is used with static=True only. Returns (model, params)."""
  if not config.static:
    wrap = _wrap(config.bits, config.grid, config.symmetric, config.group_size)
    return model, selection(model, params, config.rules).map(wrap, params)
  batches = registry.as_context(calib).batches()

  def compress_block(i, block, stats):
    updates = {}
    for k, st in stats.items():
      w = core.paths.get(block, k)
      if isinstance(w, (ActQuantized, Int8Linear, Incoherent)):
        raise ValueError(f'act_quant(static=True): block {i} {k} is {type(w).__name__}: '
                         + ('QuIP rounds the input after its transform, which a range of the input before it does '
                            'not bound; use per-token scales (static=False) after quip.' if isinstance(w, Incoherent)
                            else 'it already rounds its input; quantize activations once.'))
      scale, zero = static_qparams(jnp.min(st['min']), jnp.max(st['max']), config.bits, config.grid,
                                   config.symmetric)
      # compressed-tensors keeps input_scale in the weight's float dtype
      updates[k] = ActQuantized(w, scale=scale.astype(core.dtype_of(w)), zero=zero, bits=config.bits,
                                grid=config.grid, symmetric=config.symmetric)
    return core.paths.replace(block, updates)

  compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                    caller='act_quant')
  params, _ = calibration.run_sequential(model, params, batches, calibration.min_max(), compress_block,
                                         per_group=True, keep_stats=False)
  return model, params


def check(model, params, *, config: ActQuantConfig) -> None:
  """config.rules choose some weight (params may be abstract)."""
  selection(model, params, config.rules)


registry.register('act_quant', ActQuantConfig, act_quant, family='quantization', forbids=('shared', 'adapter'),
                  adds='quantized', check=check,
                  paper='Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs" (NeurIPS 2024): '
                  'per-token dynamic activation quantization (W4A8, W4A4)')
