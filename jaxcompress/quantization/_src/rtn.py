"""Round-to-nearest: every selected weight on its own min-max (or absmax, NF4, fp8) grid, no calibration.

The baseline of every weight quantizer (the grids of Jacob et al., CVPR 2018). `rules` choose the weights: by
default the block kernels; `embeddings=True` adds the embedding tables, and `include=(), embeddings=True` takes the
tables only. `core.Masked` kernels are quantized on their kept values (pruned entries zero) and keep their masks.

    rtn(bits=8, group_size=64, include=(), embeddings=True)                       # a recipe: the tables only
    quantization.rtn(model, params, config=quantization.RTNConfig(rules=core.Rules(include=(), embeddings=True)))
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxcompress import core, registry
from jaxcompress.quantization._src import common
from jaxcompress.quantization._src.quantizers import quantize_weight

_TARGET_GONE = ("weights are chosen by include=, exclude=, embeddings=, head= (Python: rules=core.Rules(...)); "
                "target='blocks' is the default, target='all' is embeddings=True, target='embeddings' is include=(), "
                'embeddings=True')


@registry.retired(target=_TARGET_GONE)
@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8)
  # rows per scale (None: one per output column); kernels it does not divide: None
  group_size: int | None = registry.field(128, range='[1, inf)')
  symmetric: bool = False  # symmetric grid instead of min-max
  # which weights (recipe: include=, exclude=, embeddings=, head=); the tables only: include=(), embeddings=True
  rules: core.Rules = core.Rules()
  fmt: str = 'int'  # 'int' (min-max / absmax grid), 'nf4' (QLoRA's NormalFloat, 4 bits), 'fp8' or 'fp8_e5m2'
  clip: str = 'none'  # 'mse': search a shrink of each group's range minimising the weight error (int, nf4)


def selection(model, params, rules: core.Rules) -> core.Selection:
  """The weights `rules` choose, the model's head patterns deciding what is a head; none is an error."""
  sel = core.select_by(params, model.selection_rules(rules))
  if not len(sel):
    raise ValueError(f'include={rules.include!r} exclude={rules.exclude!r} embeddings={rules.embeddings} '
                     f'head={rules.head} selects no weight of {type(model).__name__}; see model.select(params) for '
                     'the paths.')
  return sel


@common.masked_through
def rtn(model, params, calib=None, *, config: RTNConfig = RTNConfig()):
  """Every weight config.rules choose as a `core.Quantized` leaf (`quantize_weight`); calib is not used.
  Returns (model, params)."""
  del calib

  def one(_, w):
    gs = config.group_size if config.group_size is None or core.shape_of(w)[0] % config.group_size == 0 else None
    return quantize_weight(jnp.asarray(w), bits=config.bits, group_size=gs, symmetric=config.symmetric,
                           fmt=config.fmt, clip=config.clip)
  return model, selection(model, params, config.rules).map(one, params)


def check(model, params, *, config: RTNConfig) -> None:
  """config.rules select some weight, and a group_size the recipe gives divides the first dimension of
  one of them (those it does not divide get one group per column; a size dividing none would change nothing; the
  default falls back silently on small models). params may be abstract."""
  sel = selection(model, params, config.rules)
  if config.group_size != RTNConfig().group_size:
    common.check_group_size_used(config.group_size, {p: s[0] for p, s in zip(sel.paths, sel.shapes)})


registry.register('rtn', RTNConfig, rtn, family='quantization', forbids=common.DENSE_OR_MASKED,
                  adds='quantized', check=check,
                  paper='round-to-nearest min-max baseline (Jacob et al., CVPR 2018 grids)')
