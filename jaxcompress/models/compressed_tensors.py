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
What the format cannot hold (NF4, e5m2 and codebook codes, low-rank factors, shared storage, masks, quantized
embeddings or GPT-2's Conv1D weights) is refused before anything is written, naming the paths; with
`dense_fallback=True` those tensors are written dense and their Linears listed in `ignore`.

Activations: an `ActQuantized` leaf on the 'full' grid around such a weight (W8A8, W4A8: `act_quant(grid='full')`)
is written in the 'int-quantized' format llm-compressor writes for those schemes, its config group carrying
`input_activations` (int, symmetric, per token, dynamic): compressed-tensors rounds each token to
[-2^(b-1), 2^(b-1) - 1] with scale max|x| / ((2^b - 1) / 2), which is that grid; an asymmetric per-token leaf
(`act_quant(grid='full', symmetric=False)`) as `symmetric: false`, each token's range setting its scale and zero
point (vLLM's AZP int8 inputs); a per-group leaf (`group_size=g`) as `strategy: group, group_size: g`. A static
leaf (`act_quant(static=True)`: one calibrated scale per input) is written with `strategy: tensor, dynamic: false`
and its `<m>.input_scale` [1] (the weight scale's dtype), and `<m>.input_zero_point` int8 [1] when asymmetric
(`symmetric=False`). A weight scale per tensor (`strategy: tensor`, llm-compressor's FP8 scheme) is read as that
scale for every output channel: the same numbers, written back per channel. 'int-quantized' stores

  <m>.weight             int8 [out, in]      signed codes s = q - 2**(b-1)
  <m>.weight_scale       [out, groups]
  <m>.weight_zero_point  int8 [out, groups]  asymmetric only: zp = zero - 2**(b-1), unpacked

FP8 (e4m3, absmax scales: `rtn(fmt='fp8')`) kernels are written 'naive-quantized' (`<m>.weight` float8_e4m3fn
[out, in] and `<m>.weight_scale`), or 'float-quantized' inside an 'fp8'-grid `ActQuantized` (FP8 W8A8, dynamic per
token). The papers' 'narrow' grid (±(2^(b-1) - 1)) is refused by name: transformers would compute other numbers.
Nor does `dense_fallback` write an `ActQuantized` leaf dense, which would drop the rounding of its input. A model
too large for memory is written a part at a time by `export_parts` (`packed.write`).

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.models import convert, packed
from jaxcompress.models.base import Model

QUANT_METHOD = 'compressed-tensors'
FORMAT = 'pack-quantized'  # int weight-only: codes packed into int32 words
INT_FORMAT = 'int-quantized'  # int weights one code per int8, with input_activations (llm-compressor's W8A8, W4A8)
NAIVE_FORMAT = 'naive-quantized'  # FP8 weight-only: codes as float8_e4m3fn
FLOAT_FORMAT = 'float-quantized'  # FP8 weights with FP8 input_activations (llm-compressor's FP8_DYNAMIC)
VERSION = '0.20.1'  # the compressed-tensors release whose layout this module writes and reads
# Suffixes a packed Linear stores instead of `.weight`.
PACKED = ('weight_packed', 'weight_scale', 'weight_shape', 'weight_zero_point')
# The format compressed-tensors infers for (weight type, input activations rounded).
FORMATS = {('int', False): FORMAT, ('int', True): INT_FORMAT, ('float', False): NAIVE_FORMAT,
           ('float', True): FLOAT_FORMAT}


@dataclasses.dataclass(frozen=True)
class Scheme:
  """The quantization of one Linear: `bits`, groups of `group_size` inputs (None: per channel), `type` 'int' or
  'float' (FP8 e4m3 codes); with `act_bits` its input is also rounded, on the 'full' grid for int and 'fp8' for
  float: per token (dynamic; per `act_group_size` input channels of a token when given), or with `act_static` one
  calibrated scale per tensor; int activations have a zero point (per token or calibrated) unless
  `act_symmetric`. `format` is how the weight is stored (one of FORMATS' values). `weight_per_tensor` (read only): one weight scale for the whole tensor, read as that scale for every output channel."""

  bits: int
  group_size: int | None
  symmetric: bool
  type: str = 'int'
  act_bits: int | None = None
  format: str = FORMAT
  act_static: bool = False  # one calibrated input_scale per Linear (strategy 'tensor'), not one per token
  weight_per_tensor: bool = False  # read only: one weight_scale [1] per Linear (llm-compressor's FP8 scheme)
  act_symmetric: bool = True  # False (int only): a zero point per token, or a calibrated input_zero_point
  act_group_size: int | None = None  # dynamic only: one scale per this many input channels (strategy 'group')

  def activations_config(self) -> dict | None:
    """The scheme's `input_activations` QuantizationArgs (None: weight-only)."""
    if self.act_bits is None:
      return None
    strategy = 'tensor' if self.act_static else 'token' if self.act_group_size is None else 'group'
    return {'num_bits': self.act_bits, 'type': self.type, 'symmetric': self.act_symmetric,
            'group_size': self.act_group_size,
            'strategy': strategy, 'dynamic': not self.act_static, 'actorder': None, 'block_structure': None}

  def weights_config(self) -> dict:
    """The scheme's `weights` QuantizationArgs as compressed-tensors serializes them."""
    strategy = 'channel' if self.group_size is None else 'group'
    return {'num_bits': self.bits, 'type': self.type, 'symmetric': self.symmetric, 'group_size': self.group_size,
            'strategy': strategy, 'dynamic': False, 'actorder': None, 'block_structure': None}


# Export -------------------------------------------------------------------------------------------------------

LAYOUT = 'compressed-tensors'
MASKED = 'compressed-tensors 0.20 reads no sparse format (transformers would leave the weight uninitialized)'
ACT_GRID = {'int': 'full', 'float': 'fp8'}  # the activation grid compressed-tensors computes, per weight type


def _activation_refusal(w: core.ActQuantized) -> str | None:
  """Why compressed-tensors cannot compute an `ActQuantized` leaf's rounding of its input (None: it can)."""
  if w.grid == 'narrow':
    return (f"per-token activations on the 'narrow' grid: compressed-tensors rounds them to [-{2 ** (w.bits - 1)}, "
            f"{2 ** (w.bits - 1) - 1}] with scale max|x| / {(2 ** w.bits - 1) / 2}; quantize with "
            "act_quant(grid='full') to export, or keep compressed.jxc")
  if w.bits > 8:
    return f'{w.bits}-bit activations: compressed-tensors int activations hold at most 8 bits'
  inner = w.w
  weight_type = 'float' if isinstance(inner, core.Quantized) and inner.fmt == 'fp8' else 'int'
  if not isinstance(inner, core.Quantized) or inner.fmt not in ('int', 'fp8') or ACT_GRID[weight_type] != w.grid:
    want = {'full': f"int Quantized weights ({INT_FORMAT!r})", 'fp8': f"FP8 Quantized weights ({FLOAT_FORMAT!r}, "
            "rtn(fmt='fp8'))"}[w.grid]
    return (f"'{w.grid}' activation rounding around a {packed.kind(inner)} weight: compressed-tensors holds it "
            f'around {want} only')
  return None


def _refusal(w: Any, row: convert.TensorMap) -> str | None:
  if isinstance(w, core.ActQuantized):
    reason = _activation_refusal(w)
    if reason is not None:
      return reason
    w = w.w
  if isinstance(w, core.Quantized) and w.fmt == 'fp8' and np.dtype(w.codes.dtype) != np.dtype(jnp.float8_e4m3fn):
    return f'{np.dtype(w.codes.dtype).name} codes: compressed-tensors FP8 is float8_e4m3fn; core.serialize holds it'
  reason = packed.refusal(w, row, LAYOUT, MASKED, formats=('int', 'fp8'))
  if reason is None and isinstance(w, core.Quantized) and w.g_idx is not None:
    return ('act-order groups (g_idx): compressed-tensors 0.20 stores no group index; the GPTQ layout '
            '(--export=gptq) or core.serialize holds it')
  return reason


def refusals(model: Model, params: dict) -> dict[str, str]:
  """{path: why} for every leaf of `params` this format cannot hold ({}: `export` writes it all as it is)."""
  return packed.refusals(model, params, _refusal)


def _scheme(w: core.Quantized | core.ActQuantized) -> Scheme:
  act = w if isinstance(w, core.ActQuantized) else None
  q = w if act is None else w.w
  kind = 'float' if q.fmt == 'fp8' else 'int'
  return Scheme(bits=q.bits, group_size=q.group_size, symmetric=q.zero is None, type=kind,
                act_bits=None if act is None else act.bits, format=FORMATS[kind, act is not None],
                act_static=act is not None and act.static, act_symmetric=act is None or act.symmetric,
                act_group_size=None if act is None else act.group_size)


def unpacked_tensors(w: core.Quantized, module: str, dtype: Any = None) -> dict[str, np.ndarray]:
  """The 'int-quantized' / 'naive-quantized' / 'float-quantized' tensors of one Linear `module` from a leaf
  [in, out]: one code per int8 (signed, s = q - 2**(b-1)) or per float8_e4m3fn, [out, in]."""
  if w.fmt == 'fp8':
    codes = np.asarray(jax.device_get(w.codes))
  else:
    codes = (packed.host_codes(w).astype(np.int16) - 2 ** (w.bits - 1)).astype(np.int8)
  out = {f'{module}.weight': np.ascontiguousarray(codes.T),
         f'{module}.weight_scale': np.ascontiguousarray(packed.host_scale(w, dtype).T)}  # [out, groups]
  zero = packed.host_zero(w)
  if zero is not None:
    out[f'{module}.weight_zero_point'] = np.ascontiguousarray(
        (zero.astype(np.int16) - 2 ** (w.bits - 1)).T.astype(np.int8))
  return out


def _tensors(w: core.Quantized | core.ActQuantized, module: str, dtype: Any = None) -> dict[str, np.ndarray]:
  if _scheme(w).format == FORMAT:
    return packed_tensors(w, module, dtype)
  if not isinstance(w, core.ActQuantized):
    return unpacked_tensors(w, module, dtype)
  out = unpacked_tensors(w.w, module, dtype)
  if w.static:
    scale_dtype = out[f'{module}.weight_scale'].dtype
    out[f'{module}.input_scale'] = np.asarray(jax.device_get(w.scale)).astype(scale_dtype).reshape(1)
    if w.zero is not None:
      out[f'{module}.input_zero_point'] = np.asarray(jax.device_get(w.zero)).astype(np.int8).reshape(1)
  return out


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
  groups = {f'group_{k}': {'targets': names, 'weights': scheme.weights_config(),
                           'input_activations': scheme.activations_config(), 'output_activations': None,
                           'format': scheme.format}
            for k, (scheme, names) in enumerate(by_scheme.items())}
  formats = {scheme.format for scheme in by_scheme}
  fmt = 'dense' if not formats else formats.pop() if len(formats) == 1 else 'mixed-precision'
  return {'quant_method': QUANT_METHOD, 'version': VERSION, 'format': fmt,
          'quantization_status': 'compressed', 'config_groups': groups, 'ignore': sorted(ignore),
          'kv_cache_scheme': None, 'global_compression_ratio': None, 'sparsity_config': {},
          'transform_config': {}}


def layout() -> packed.Layout:
  return packed.Layout(LAYOUT, _refusal, _tensors, _scheme, quantization_config)


def export(model: Model, params: dict, out_dir: str | os.PathLike, *, dense_fallback: bool = False,
           dtype: Any = None, max_shard_bytes: int = 4 << 30) -> Path:
  """Writes a compressed-tensors checkpoint directory that transformers (with compressed-tensors installed), vLLM
  and `models.from_pretrained` load: int `Quantized` Linear kernels as 'pack-quantized', those inside a 'full'-grid
  `ActQuantized` as 'int-quantized' with their dynamic per-token input activations, FP8 ones as 'naive-quantized'
  (or 'float-quantized' inside an 'fp8'-grid `ActQuantized`), the rest dense.

  Leaves the format cannot hold are refused before anything is written (a ValueError naming each path, its kind
  and a format that holds it); with `dense_fallback=True` they are written dense instead and their Linears
  listed in `ignore`. `dtype` casts the dense tensors and the scales (e.g. jnp.bfloat16); codes, zero points
  and shapes are exact integers.
  """
  return export_parts(model, [lambda: params], out_dir, dense_fallback=dense_fallback, dtype=dtype,
                      max_shard_bytes=max_shard_bytes)


def export_parts(model: Model, parts: Sequence[packed.Part], out_dir: str | os.PathLike, *,
                 dense_fallback: bool = False, dtype: Any = None, max_shard_bytes: int = 4 << 30) -> Path:
  """`export` of a tree given as loaders of its disjoint parts (e.g. the blocks of an out-of-core compression,
  `calibration.compressed_parts`), holding one part in memory at a time (`packed.write`)."""
  return packed.write(model, parts, out_dir, layout(), who='compressed_tensors.export',
                      dense_fallback=dense_fallback, dtype=dtype, max_shard_bytes=max_shard_bytes)


# Import -------------------------------------------------------------------------------------------------------


def _read_scheme(cfg_file: Path, name: str, group: dict, default_format: str) -> Scheme:
  """A config group's scheme, or a ValueError naming the field this module cannot represent."""
  where = f'config_groups.{name}'
  if not isinstance(group, dict):
    raise packed.field_error(cfg_file, where, group, 'a scheme object (preset names are not read)')
  if group.get('output_activations') is not None:
    raise packed.field_error(cfg_file, f'{where}.output_activations', group['output_activations'], 'null')
  w = group.get('weights')
  if not isinstance(w, dict):
    raise packed.field_error(cfg_file, f'{where}.weights', w, 'a QuantizationArgs object')
  at = lambda f: f'{where}.weights.{f}'
  kind = w.get('type', 'int')
  if kind not in ('int', 'float'):
    raise packed.field_error(cfg_file, at('type'), kind, "'int' or 'float' (FP8)")
  bits = w.get('num_bits', 8)
  if not isinstance(bits, int) or not 1 <= bits <= 8 or (kind == 'float' and bits != 8):
    raise packed.field_error(cfg_file, at('num_bits'), bits, 'an integer in 1..8' if kind == 'int' else
                             '8 (float8_e4m3fn)')
  act_bits, act_static, act_symmetric, act_group_size = _read_activations(cfg_file, f'{where}.input_activations',
                                                          group.get('input_activations'), kind)
  fmt = group.get('format') or default_format
  allowed = [f for (k, _), f in FORMATS.items() if k == kind] + ([NAIVE_FORMAT] if kind == 'int' else [])
  if fmt not in allowed:
    raise packed.field_error(cfg_file, f'{where}.format', fmt, f'one of {allowed} for {kind} weights')
  if w.get('dynamic', False) not in (False, None):
    raise packed.field_error(cfg_file, at('dynamic'), w.get('dynamic'), 'false (static weight scales)')
  if w.get('actorder') not in (None, False, 'weight', 'static'):
    raise packed.field_error(cfg_file, at('actorder'), w.get('actorder'), "null, 'weight' or 'static' (no g_idx)")
  if w.get('block_structure') is not None:
    raise packed.field_error(cfg_file, at('block_structure'), w.get('block_structure'), 'null')
  group_size, strategy = w.get('group_size'), w.get('strategy')
  if strategy is None:
    strategy = 'channel' if group_size == -1 else 'group' if group_size else 'tensor'
  if strategy in ('channel', 'tensor'):  # one scale per tensor is read as that scale for every output channel
    group_size = None
  elif strategy != 'group' or not isinstance(group_size, int) or group_size <= 0:
    raise packed.field_error(cfg_file, at('strategy'), strategy, "'group' (with a positive group_size), 'channel' "
                             "or 'tensor'")
  symmetric = w.get('symmetric', True)
  if not isinstance(symmetric, bool) or (kind == 'float' and not symmetric):
    raise packed.field_error(cfg_file, at('symmetric'), symmetric, 'true or false' if kind == 'int' else
                             'true (FP8 scales are absmax)')
  if strategy == 'tensor' and (not symmetric or fmt == FORMAT):
    raise packed.field_error(cfg_file, at('strategy'), strategy, "'group' or 'channel' ('tensor' is read for "
                             "symmetric unpacked weights: llm-compressor's FP8 and int8 schemes)")
  return Scheme(bits=bits, group_size=group_size, symmetric=symmetric, type=kind, act_bits=act_bits, format=fmt,
                act_static=act_static, act_symmetric=act_symmetric, act_group_size=act_group_size,
                weight_per_tensor=strategy == 'tensor')


def _read_activations(cfg_file: Path, where: str, a: Any, kind: str
                      ) -> tuple[int | None, bool, bool, int | None]:
  """(bits (None: weight-only), static, symmetric, group size) of a config group's `input_activations`, or a
  ValueError naming the field this module cannot represent. An `ActQuantized` leaf rounds to the weights' type
  (int: the 'full' grid, float: 'fp8') either per token or per group of a token's channels (dynamic) or with one
  static per-tensor scale, symmetric or (int) with a zero point; nothing else is read."""
  if a is None:
    return None, False, True, None
  if not isinstance(a, dict):
    raise packed.field_error(cfg_file, where, a, 'null or a QuantizationArgs object')
  if a.get('type', 'int') != kind:
    raise packed.field_error(cfg_file, f'{where}.type', a.get('type'), f"'{kind}' (the weights' type)")
  dynamic = a.get('dynamic', False)
  if dynamic not in (True, False):
    raise packed.field_error(cfg_file, f'{where}.dynamic', dynamic, 'true (per token) or false (static per tensor)')
  strategy = a.get('strategy')
  want = ('token', 'group') if dynamic else ('tensor',)
  if strategy not in want:
    raise packed.field_error(cfg_file, f'{where}.strategy', strategy, ' or '.join(f"'{w}'" for w in want)
                             + f' (dynamic={str(dynamic).lower()}: '
                             + ('scales computed per token at run time)' if dynamic else 'one calibrated input_scale)'))
  group_size = a.get('group_size') if strategy == 'group' else None
  if strategy == 'group' and (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1):
    raise packed.field_error(cfg_file, f'{where}.group_size', group_size, "a positive integer (strategy 'group')")
  symmetric = a.get('symmetric', True)
  if symmetric is not True and (kind == 'float' or symmetric is not False):
    raise packed.field_error(cfg_file, f'{where}.symmetric', symmetric, 'true or false' if kind == 'int' else
                             'true (FP8 activations are symmetric)')
  bits = a.get('num_bits', 8)
  if not isinstance(bits, int) or not 2 <= bits <= 8 or (kind == 'float' and bits != 8):
    raise packed.field_error(cfg_file, f'{where}.num_bits', bits, 'an integer in 2..8' if kind == 'int' else '8')
  return bits, not dynamic, symmetric, group_size


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
                   shape: tuple[int, int], scale_dtype: Any = None) -> core.Quantized | core.ActQuantized:
  """The `Quantized` leaf [in, out] of one packed Linear (inside an `ActQuantized` on the 'full' grid when its scheme
  rounds input activations). get(tensor name) -> (array, file name); `shape` is the
  kernel shape the config implies. Shapes that disagree are a ValueError naming the file and tensor."""
  n_in, n_out = shape
  groups = 1 if scheme.group_size is None else n_in // max(scheme.group_size, 1)
  b = scheme.bits

  read = packed.checked_reader(module, get, f'the {b}-bit scheme and config.json')
  if scheme.group_size is not None and n_in % scheme.group_size:
    raise ValueError(f"'{module}': group_size={scheme.group_size} does not divide in_features={n_in}.")
  if scheme.weight_per_tensor:  # the tensor's one scale, repeated for every output channel: the same numbers
    scale = np.ascontiguousarray(np.broadcast_to(read('weight_scale', (1,), 'f').reshape(1, 1), (1, n_out)))
  else:
    scale = read('weight_scale', (n_out, groups), 'f').T  # [groups, out]
  if scale_dtype is not None:
    scale = scale.astype(scale_dtype)
  if scheme.format == FORMAT:
    leaf = _read_packed(read, get, scheme, module, (n_in, n_out), scale)
  elif scheme.type == 'float':
    leaf = _read_fp8(get, scheme, module, (n_in, n_out), scale)
  else:
    leaf = _read_int(read, get, scheme, module, (n_in, n_out), scale)
  if scheme.act_bits is None:
    return leaf
  qparams = {}
  if scheme.act_static:
    qparams['scale'] = jax.device_put(read('input_scale', (1,), 'f').reshape(()))
    if not scheme.act_symmetric:
      zero = read('input_zero_point', (1,), 'i').astype(np.int32).reshape(())
      lo, hi, _ = core.activations.token_range(scheme.act_bits, 'full')
      if not lo <= zero <= hi:
        _, file = get(f'{module}.input_zero_point')
        raise ValueError(f"tensor '{module}.input_zero_point' in '{file}' is {int(zero)}, outside the "
                         f'{scheme.act_bits}-bit range [{lo}, {hi}] config.json gives.')
      qparams['zero'] = jax.device_put(zero)
  if scheme.act_group_size is not None and n_in % scheme.act_group_size:
    raise ValueError(f"'{module}': input_activations.group_size={scheme.act_group_size} does not divide "
                     f'in_features={n_in}.')
  return core.ActQuantized(leaf, bits=scheme.act_bits, grid=ACT_GRID[scheme.type], symmetric=scheme.act_symmetric,
                           group_size=scheme.act_group_size,
                           **qparams)


def _read_fp8(get, scheme: Scheme, module: str, shape: tuple[int, int], scale: np.ndarray) -> core.Quantized:
  """One FP8 Linear ('naive-quantized' or 'float-quantized'): codes float8_e4m3fn [out, in], absmax scales."""
  n_in, n_out = shape
  arr, file = get(f'{module}.weight')
  if tuple(arr.shape) != (n_out, n_in) or arr.dtype != np.dtype(jnp.float8_e4m3fn):
    raise ValueError(f"tensor '{module}.weight' in '{file}' is {arr.dtype} {list(arr.shape)}; the FP8 scheme and "
                     f'config.json imply float8_e4m3fn {[n_out, n_in]}.')
  return core.Quantized(codes=jax.device_put(np.ascontiguousarray(arr.T)),
                        scale=jax.device_put(np.ascontiguousarray(scale)), zero=None, bits=8,
                        group_size=scheme.group_size, fmt='fp8', packed=False, logical_shape=(n_in, n_out))


def _read_int(read, get, scheme: Scheme, module: str, shape: tuple[int, int], scale: np.ndarray) -> core.Quantized:
  """One 'int-quantized' (or int 'naive-quantized') Linear: signed codes one per int8 [out, in], codes outside the
  b-bit range refused."""
  (n_in, n_out), b = shape, scheme.bits
  offset = 2 ** (b - 1)
  signed = read('weight', (n_out, n_in), 'i').astype(np.int16)
  if signed.min(initial=0) < -offset or signed.max(initial=0) >= offset:
    _, file = get(f'{module}.weight')
    raise ValueError(f"tensor '{module}.weight' in '{file}' holds codes in [{signed.min()}, {signed.max()}], outside "
                     f'the {b}-bit range [{-offset}, {offset - 1}] config.json gives.')
  zero = None
  if not scheme.symmetric:
    zero = (read('weight_zero_point', (n_out, len(scale)), 'i').astype(np.int16).T + offset).astype(scale.dtype)
  return packed.int_leaf((signed.T + offset).astype(np.uint8), scale, zero, b, scheme.group_size)


def _read_packed(read, get, scheme: Scheme, module: str, shape: tuple[int, int], scale: np.ndarray
                 ) -> core.Quantized:
  """One 'pack-quantized' Linear: codes packed into int32 words along `in`, zero points along `out`."""
  (n_in, n_out), b = shape, scheme.bits
  stored = read('weight_shape', (2,), 'iu')
  if [int(x) for x in stored] != [n_out, n_in]:
    _, file = get(f'{module}.weight_shape')
    raise ValueError(f"tensor '{module}.weight_shape' in '{file}' is {[int(x) for x in stored]}; config.json "
                     f'implies [{n_out}, {n_in}].')
  codes = packed.unpack_int32(read('weight_packed', (n_out, math.ceil(n_in * b / 32)), 'i'), b, n_in).T
  zero = None
  if not scheme.symmetric:
    zp = read('weight_zero_point', (math.ceil(n_out * b / 32), len(scale)), 'i')
    zero = packed.unpack_int32(np.ascontiguousarray(zp.T), b, n_out).astype(scale.dtype)  # [groups, out]
  return packed.int_leaf(codes, scale, zero, b, scheme.group_size)
