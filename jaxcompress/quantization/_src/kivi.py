"""KIVI: a quantized KV cache (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML
2024). Keys per channel, values per token, each group of G numbers on its own min-max grid,

    z = min X,  s = (max X - min X) / (2^b - 1),  X' = clamp(round((X - z) / s), 0, 2^b - 1) s + z,

and the newest R tokens kept in full precision. The weights are untouched: the stage records the cache format on
the model's config (`kv_cache`), which `models.generate` uses by default and which config.json keeps
(`models.decode.KV_CACHE_FIELD`), so a saved and reloaded result decodes with the same cache. The cache itself
lives in `models/decode.py`.

    kivi(bits=4, group_size=32, residual=32)                                               # a recipe stage
    model, params = quantization.kivi(model, params, None, config=quantization.KIVIConfig(bits=2))
    models.generate(model, params, prompt, max_new_tokens=32)                              # int2 keys and values
"""

from __future__ import annotations

import dataclasses

from jaxcompress import registry
from jaxcompress.models import decode


@dataclasses.dataclass(frozen=True, kw_only=True)
class KIVIConfig:
  bits: int = registry.field(4, range='[2, 8]')  # code bits of keys and values: 8, 4 or 2
  group_size: int = registry.field(32, range='[1, inf)')  # tokens per key group, channels per value group
  residual: int = registry.field(32, range='[0, inf)')  # newest tokens kept in full precision; a multiple of group_size

  def __post_init__(self):
    self.format()  # a bad combination fails where the config is made (a recipe: when it is parsed)

  def format(self) -> decode.KVCacheFormat:
    return decode.KVCacheFormat(bits=self.bits, group_size=self.group_size, residual=self.residual)


def check(model, params, *, config: KIVIConfig) -> None:
  """A ValueError unless the model is a causal LM whose config can hold a cache format and whose heads the groups
  tile; from the config alone."""
  del params
  name = type(model).__name__
  if not model.causal:
    raise ValueError(f'kivi: {name} is an encoder; it decodes nothing and has no KV cache. Use kivi on a causal LM.')
  c = model.config
  if not any(f.name == 'kv_cache' for f in dataclasses.fields(c)):
    raise ValueError(f'kivi: {type(c).__name__} has no kv_cache field, so {name} cannot record a cache format.')
  head_dim = getattr(c, 'dim_per_head', None) or c.head_dim
  try:
    config.format().check_head_dim(head_dim)
  except ValueError as e:
    raise ValueError(f'kivi: {name}: {e}') from None


def kivi(model, params, calib=None, *, config: KIVIConfig = KIVIConfig()):
  """(model whose config names the KIVI cache format, params unchanged); calib is not used."""
  del calib
  check(model, params, config=config)
  spec = dataclasses.replace(model, config=dataclasses.replace(model.config, kv_cache=config.format()))
  return spec, params


registry.register('kivi', KIVIConfig, kivi, family='quantization', check=check,
                  paper='Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024)')
