"""compressed-tensors checkpoints in and out: quantized linears stay packed integer codes in the layout
llm-compressor writes and transformers reads, and such checkpoints load back as `Quantized` leaves.

    export(model, params, 'out/dir')                    # config.json with a quantization_config + safetensors
    model, params = models.from_pretrained('out/dir')   # the same codes, scales and zero points, not a dense copy
    transformers.AutoModelForCausalLM.from_pretrained('out/dir')   # with compressed-tensors installed

The layout is that of compressed-tensors 0.20 (`PackedQuantizationCompressor`, format 'pack-quantized'): int
weight-only quantization of torch Linear weights [out, in], groups running along `in` (ours: groups along the
rows of [in, out]). A Linear `<m>` quantized to b bits stores

  <m>.weight_packed      int32 [out, ceil(in * b / 32)]  each output row's codes as one little-endian bit stream
                         (code i at bits i*b ... i*b+b-1; codes straddle words when 32 % b != 0)
  <m>.weight_scale       [out, in // group_size] ([out, 1] per channel), the scale's own float dtype
  <m>.weight_zero_point  int32 [ceil(out * b / 32), groups]  asymmetric only: zero points packed the same way
                         along `out`
  <m>.weight_shape       int64 [2] = [out, in]

compressed-tensors computes w = (s - zp) * scale over signed codes s = q - 2**(b-1) (the packer's offset), and
ours is w = (q - zero) * scale, so zp = zero - 2**(b-1): a symmetric scheme (zp = 0, no tensor) is our zero=None.
What the format cannot hold (NF4, fp8 and codebook codes, low-rank factors, shared storage, masks, quantized
embeddings or GPT-2's Conv1D weights) is refused before anything is written, naming the paths; with
`dense_fallback=True` those tensors are written dense and their Linears listed in `ignore`.

transformers 5.25 (with compressed-tensors 0.20.1) loads symmetric schemes on its default path; asymmetric ones
need `CompressedTensorsConfig(dequantize=True)`, whose path applies the first config group's scheme to every
Linear (its default path allocates unpacked zero points and refuses the packed ones compressed-tensors writes).

Sparsity: compressed-tensors 0.20 reads no sparse format (it writes `sparsity_config: {}` and has no bitmask
decompressor), so a transformers load of a sparse-bitmask checkpoint would leave those weights uninitialized;
`Masked` leaves are therefore refused (or written dense with `dense_fallback=True`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxcompress import core
from jaxcompress.models import convert, hf, packed
from jaxcompress.models.base import Model

QUANT_METHOD = 'compressed-tensors'
FORMAT = 'pack-quantized'
VERSION = '0.20.1'  # the compressed-tensors release whose layout this module writes and reads
# Suffixes a packed Linear stores instead of `.weight`.
PACKED = ('weight_packed', 'weight_scale', 'weight_shape', 'weight_zero_point')


@dataclasses.dataclass(frozen=True)
class Scheme:
  """Int weight-only quantization of one Linear: `bits`, groups of `group_size` inputs (None: per channel)."""

  bits: int
  group_size: int | None
  symmetric: bool

  def weights_config(self) -> dict:
    """The scheme's `weights` QuantizationArgs as compressed-tensors serializes them."""
    strategy = 'channel' if self.group_size is None else 'group'
    return {'num_bits': self.bits, 'type': 'int', 'symmetric': self.symmetric, 'group_size': self.group_size,
            'strategy': strategy, 'dynamic': False, 'actorder': None, 'block_structure': None}


# Export -------------------------------------------------------------------------------------------------------

LAYOUT = "compressed-tensors 'pack-quantized'"
MASKED = 'compressed-tensors 0.20 reads no sparse format (transformers would leave the weight uninitialized)'


def _refusal(w: Any, row: convert.TensorMap) -> str | None:
  reason = packed.refusal(w, row, LAYOUT, MASKED)
  if reason is None and isinstance(w, core.Quantized) and w.g_idx is not None:
    return (f'act-order groups (g_idx): compressed-tensors 0.20 {LAYOUT} stores no group index; the GPTQ layout '
            '(--export=gptq) or core.serialize holds it')
  return reason


def refusals(model: Model, params: dict) -> dict[str, str]:
  """{path: why} for every leaf of `params` this format cannot hold ({}: `export` writes it all as it is)."""
  return packed.refusals(model, params, _refusal)


def _scheme(w: core.Quantized) -> Scheme:
  return Scheme(bits=w.bits, group_size=w.group_size, symmetric=w.zero is None)


def packed_tensors(w: core.Quantized, module: str, dtype: Any = None) -> dict[str, np.ndarray]:
  """The 'pack-quantized' tensors of one Linear `module` ('model.layers.0.mlp.up_proj') from an int leaf
  [in, out]; `dtype` casts the scale (the codes and zero points are exact integers)."""
  codes = packed.host_codes(w).T  # [out, in]
  out = {f'{module}.weight_packed': packed.pack_int32(codes, w.bits),
         f'{module}.weight_scale': np.ascontiguousarray(packed.host_scale(w, dtype).T),  # [out, groups]
         f'{module}.weight_shape': np.asarray(codes.shape, np.int64)}
  zero = packed.host_zero(w)  # [groups, out]
  if zero is not None:
    out[f'{module}.weight_zero_point'] = np.ascontiguousarray(packed.pack_int32(zero, w.bits).T)
  return out


def quantization_config(schemes: dict[str, Scheme], ignore: list[str]) -> dict:
  """config.json's `quantization_config`: one config group per scheme, targeting its Linears by name."""
  by_scheme: dict[Scheme, list[str]] = {}
  for module, scheme in schemes.items():
    by_scheme.setdefault(scheme, []).append(module)
  groups = {f'group_{k}': {'targets': names, 'weights': scheme.weights_config(), 'input_activations': None,
                           'output_activations': None, 'format': FORMAT}
            for k, (scheme, names) in enumerate(by_scheme.items())}
  return {'quant_method': QUANT_METHOD, 'version': VERSION, 'format': FORMAT if groups else 'dense',
          'quantization_status': 'compressed', 'config_groups': groups, 'ignore': sorted(ignore),
          'kv_cache_scheme': None, 'global_compression_ratio': None, 'sparsity_config': {},
          'transform_config': {}}


def export(model: Model, params: dict, out_dir: str | os.PathLike, *, dense_fallback: bool = False,
           dtype: Any = None, max_shard_bytes: int = 4 << 30) -> Path:
  """Writes a compressed-tensors checkpoint directory that transformers (with compressed-tensors installed), vLLM
  and `models.from_pretrained` load: int `Quantized` Linear kernels as 'pack-quantized', the rest dense.

  Leaves the format cannot hold are refused before anything is written (a ValueError naming each path, its kind
  and a format that holds it); with `dense_fallback=True` they are written dense instead and their Linears
  listed in `ignore`. `dtype` casts the dense tensors and the scales (e.g. jnp.bfloat16); codes, zero points
  and shapes are exact integers.
  """
  flat, refused = packed.refuse(model, params, 'compressed_tensors.export', 'compressed-tensors', _refusal,
                                dense_fallback)
  tensors, quantized, dense = packed.export_tensors(model, flat, refused, dtype,
                                                    lambda w, module: packed_tensors(w, module, dtype))
  schemes = {module: _scheme(w) for module, w in quantized.items()}
  return hf.write_checkpoint(out_dir, model, tensors, max_shard_bytes,
                             config_fields={'quantization_config': quantization_config(schemes, dense)})


# Import -------------------------------------------------------------------------------------------------------


def _read_scheme(cfg_file: Path, name: str, group: dict, default_format: str) -> Scheme:
  """A config group's scheme, or a ValueError naming the field this module cannot represent."""
  where = f'config_groups.{name}'
  if not isinstance(group, dict):
    raise packed.field_error(cfg_file, where, group, 'a scheme object (preset names are not read)')
  for field in ('input_activations', 'output_activations'):
    if group.get(field) is not None:
      raise packed.field_error(cfg_file, f'{where}.{field}', group[field], 'null (weight-only quantization)')
  fmt = group.get('format') or default_format
  if fmt != FORMAT:
    raise packed.field_error(cfg_file, f'{where}.format', fmt, f"'{FORMAT}'")
  w = group.get('weights')
  if not isinstance(w, dict):
    raise packed.field_error(cfg_file, f'{where}.weights', w, 'a QuantizationArgs object')
  at = lambda f: f'{where}.weights.{f}'
  if w.get('type', 'int') != 'int':
    raise packed.field_error(cfg_file, at('type'), w.get('type'), "'int'")
  bits = w.get('num_bits', 8)
  if not isinstance(bits, int) or not 1 <= bits <= 8:
    raise packed.field_error(cfg_file, at('num_bits'), bits, 'an integer in 1..8')
  if w.get('dynamic', False) not in (False, None):
    raise packed.field_error(cfg_file, at('dynamic'), w.get('dynamic'), 'false (static weight scales)')
  if w.get('actorder') not in (None, False, 'weight', 'static'):
    raise packed.field_error(cfg_file, at('actorder'), w.get('actorder'), "null, 'weight' or 'static' (no g_idx)")
  if w.get('block_structure') is not None:
    raise packed.field_error(cfg_file, at('block_structure'), w.get('block_structure'), 'null')
  group_size, strategy = w.get('group_size'), w.get('strategy')
  if strategy is None:
    strategy = 'channel' if group_size == -1 else 'group' if group_size else 'tensor'
  if strategy == 'channel':
    group_size = None
  elif strategy != 'group' or not isinstance(group_size, int) or group_size <= 0:
    raise packed.field_error(cfg_file, at('strategy'), strategy, "'group' (with a positive group_size) or 'channel'")
  symmetric = w.get('symmetric', True)
  if not isinstance(symmetric, bool):
    raise packed.field_error(cfg_file, at('symmetric'), symmetric, 'true or false')
  return Scheme(bits=bits, group_size=group_size, symmetric=symmetric)


def _matches(name: str, targets: list[str]) -> bool:
  """compressed-tensors' matching of a Linear module name: exact names, 're:' regexes (re.match), the class."""
  return any(t == name or t == 'Linear' or (t.startswith('re:') and re.match(t[3:], name)) for t in targets)


def read_plan(cfg: dict, cfg_file: Path, linear_modules: list[str]) -> dict[str, Scheme]:
  """{Linear module name as the checkpoint spells it: its scheme} from config.json's quantization_config ({}
  without one). Any field this module cannot represent is a ValueError naming it and its value."""
  q = cfg.get('quantization_config')
  if q is None:
    return {}
  if not isinstance(q, dict):
    raise packed.field_error(cfg_file, '', q, 'a JSON object')
  if q.get('quant_method') != QUANT_METHOD:
    raise packed.field_error(cfg_file, 'quant_method', q.get('quant_method'), f"'{QUANT_METHOD}' or 'gptq' (the "
                       'quantized checkpoint formats read here)')
  release = re.match(r'(\d+)\.(\d+)', str(q.get('version', '')))
  if release is None or (int(release[1]), int(release[2])) < (0, 20):
    bits_used = {g.get('weights', {}).get('num_bits') for g in (q.get('config_groups') or {}).values()
                 if isinstance(g, dict) and isinstance(g.get('weights'), dict)}
    if any(b is not None and 32 % b for b in bits_used):  # layouts agree for 1, 2, 4 and 8 bits
      raise packed.field_error(cfg_file, 'version', q.get('version'), f"'{VERSION}' or later for {sorted(bits_used)}-bit "
                         'weights (the packing of codes that straddle int32 words changed)')
  for field, empty in (('kv_cache_scheme', None), ('transform_config', None), ('sparsity_config', None),
                       ('moe_sparsity_config', None)):
    if q.get(field) not in (empty, {}):
      raise packed.field_error(cfg_file, field, q.get(field), 'null or {}')
  if q.get('quantization_status', 'compressed') != 'compressed':
    raise packed.field_error(cfg_file, 'quantization_status', q.get('quantization_status'), "'compressed'")
  groups = q.get('config_groups') or {}
  default_format = q.get('format', FORMAT)
  schemes = [(g.get('targets') or [], _read_scheme(cfg_file, n, g, default_format)) for n, g in groups.items()]
  ignore = q.get('ignore') or []
  for t in [t for targets, _ in schemes for t in targets] + list(ignore):
    if not isinstance(t, str) or (not t.startswith('re:') and not re.fullmatch(r'[\w.]+', t)):
      raise packed.field_error(cfg_file, 'targets', t, "a module name, a 're:' regex or the class 'Linear'")
    if t in ('Embedding', 'Conv1D'):
      raise packed.field_error(cfg_file, 'targets', t, "Linear modules (quantized embeddings are not read)")
  plan = {}
  for module in linear_modules:
    if _matches(module, ignore):
      continue
    # compressed-tensors prefers an exact name over a regex over the class name.
    ranked = sorted((0 if module in targets else 2 if targets == ['Linear'] else 1, k)
                    for k, (targets, _) in enumerate(schemes) if _matches(module, targets))
    if ranked:
      plan[module] = schemes[ranked[0][1]][1]
  return plan


def read_quantized(scheme: Scheme, module: str, get: Callable[[str], tuple[np.ndarray, str]],
                   shape: tuple[int, int], scale_dtype: Any = None) -> core.Quantized:
  """The `Quantized` leaf [in, out] of one packed Linear. get(tensor name) -> (array, file name); `shape` is the
  kernel shape the config implies. Shapes that disagree are a ValueError naming the file and tensor."""
  n_in, n_out = shape
  groups = 1 if scheme.group_size is None else n_in // max(scheme.group_size, 1)
  b = scheme.bits

  read = packed.checked_reader(module, get, f'the {b}-bit scheme and config.json')
  if scheme.group_size is not None and n_in % scheme.group_size:
    raise ValueError(f"'{module}': group_size={scheme.group_size} does not divide in_features={n_in}.")
  stored = read('weight_shape', (2,), 'iu')
  if [int(x) for x in stored] != [n_out, n_in]:
    _, file = get(f'{module}.weight_shape')
    raise ValueError(f"tensor '{module}.weight_shape' in '{file}' is {[int(x) for x in stored]}; config.json "
                     f'implies [{n_out}, {n_in}].')
  codes = packed.unpack_int32(read('weight_packed', (n_out, math.ceil(n_in * b / 32)), 'i'), b, n_in).T
  scale = read('weight_scale', (n_out, groups), 'f').T
  if scale_dtype is not None:
    scale = scale.astype(scale_dtype)
  zero = None
  if not scheme.symmetric:
    zp = read('weight_zero_point', (math.ceil(n_out * b / 32), groups), 'i')
    zero = packed.unpack_int32(np.ascontiguousarray(zp.T), b, n_out).astype(scale.dtype)  # [groups, out]
  return packed.int_leaf(codes, scale, zero, b, scheme.group_size)
