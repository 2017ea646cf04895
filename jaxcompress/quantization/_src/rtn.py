"""Round-to-nearest: every selected weight on its own min-max (or absmax, NF4, fp8) grid, no calibration.

The baseline of every weight quantizer (the grids of Jacob et al., CVPR 2018). `target` picks the block kernels,
the embedding tables or both; `include` narrows that by path. `core.Masked` kernels are quantized on their kept
values (pruned entries zero) and keep their masks.
"""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp

from jaxcompress import core, registry
from jaxcompress.quantization._src import common
from jaxcompress.quantization._src.quantizers import quantize_weight


@dataclasses.dataclass(frozen=True, kw_only=True)
class RTNConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8)
  # rows per scale (None: one per output column); kernels it does not divide: None
  group_size: int | None = registry.field(128, range='[1, inf)')
  symmetric: bool = False  # symmetric grid instead of min-max
  target: str = 'blocks'  # 'blocks' (block kernels), 'embeddings' (embedding tables) or 'all'
  include: str = '.'  # path regex within the target
  fmt: str = 'int'  # 'int' (min-max / absmax grid), 'nf4' (QLoRA's NormalFloat, 4 bits), 'fp8' or 'fp8_e5m2'
  clip: str = 'none'  # 'mse': search a shrink of each group's range minimising the weight error (int, nf4)


def target_selection(model, params, target: str, include: str) -> core.Selection:
  """The weights of `target` ('blocks', 'embeddings' or 'all') whose paths match the regex `include`."""
  if target not in ('blocks', 'embeddings', 'all'):
    raise ValueError(f"target={target!r}: choose 'blocks', 'embeddings' or 'all'.")
  sel = model.select(params, embeddings=target != 'blocks')
  emb = core.select(params, include=r'embedding$', embeddings=True).paths
  keep = [p for p in sel.paths if (target == 'all' or (p in emb) == (target == 'embeddings'))]
  rx = re.compile(include)
  keep = [p for p in keep if rx.search(p)]
  if not keep:
    raise ValueError(f'target={target!r} include={include!r} selects no weight of {type(model).__name__}.')
  # A tied head is the embedding table: selecting heads for a blocks-only target would quantize it too.
  wide = target != 'blocks'
  return core.select(params, include=[f'^{re.escape(p)}$' for p in keep], embeddings=wide, head=wide)


@common.masked_through
def rtn(model, params, calib=None, *, config: RTNConfig = RTNConfig()):
  """Every weight of config.target as a `core.Quantized` leaf (`quantize_weight`); calib is not used.
  Returns (model, params)."""
  del calib

  def one(_, w):
    gs = config.group_size if config.group_size is None or core.shape_of(w)[0] % config.group_size == 0 else None
    return quantize_weight(jnp.asarray(w), bits=config.bits, group_size=gs, symmetric=config.symmetric,
                           fmt=config.fmt, clip=config.clip)
  return model, target_selection(model, params, config.target, config.include).map(one, params)


def check(model, params, *, config: RTNConfig) -> None:
  """config.target / include select some weight, and a group_size the recipe gives divides the first dimension of
  one of them (those it does not divide get one group per column; a size dividing none would change nothing; the
  default falls back silently on small models). params may be abstract."""
  sel = target_selection(model, params, config.target, config.include)
  if config.group_size != RTNConfig().group_size:
    common.check_group_size_used(config.group_size, {p: s[0] for p, s in zip(sel.paths, sel.shapes)})


registry.register('rtn', RTNConfig, rtn, family='quantization', forbids=common.DENSE_OR_MASKED,
                  adds='quantized', check=check,
                  paper='round-to-nearest min-max baseline (Jacob et al., CVPR 2018 grids)')
