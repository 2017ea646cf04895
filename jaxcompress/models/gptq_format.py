"""GPTQ checkpoints in and out: the layout AutoGPTQ, GPTQModel and transformers' GPTQ integration (optimum over
GPTQModel) read, with int `Quantized` Linears kept as packed codes, and such checkpoints loaded back as leaves.

    export(model, params, 'out/dir')                    # config.json with quantization_config {quant_method: gptq}
    model, params = models.from_pretrained('out/dir')   # the same codes, scales and zero points, not a dense copy

A Linear `<m>` [out, in] quantized to b bits (b in 2, 3, 4, 8) in groups of `group_size` inputs stores

  <m>.qweight  int32 [in // 32 * b, out]      each column's codes along `in` as one little-endian bit stream,
                                              32 // b codes per word (3 bits: 32 codes in 3 words, codes 10
                                              and 21 straddling words)
  <m>.qzeros   int32 [groups, out // 32 * b]  each group's zero points along `out`, packed the same way
  <m>.scales   [groups, out]                  conventionally float16 (`dtype=jnp.float16`); here the scale's dtype
  <m>.g_idx    int32 [in]                     the group of each input: i // group_size, or the leaf's g_idx (act-order)

and w[i, o] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o]): our codes, scales and zero points exactly
(groups run along `in` in both), with `group_size: -1` for one group per column.

Zero points: `checkpoint_format: gptq` (v1, what AutoGPTQ wrote and every reader takes) stores z - 1, so a zero
point of 0 cannot be written (GPTQModel adds 1 to every packed field when it loads v1; AutoGPTQ adds 1 after
unpacking); `gptq_v2` (GPTQModel's own) stores z. A symmetric leaf (zero=None) is z = 2**(b-1) everywhere and
`sym: true`. One scheme (bits, group_size, sym) is the config's; Linears with another scheme are GPTQModel
`dynamic` overrides ('+:^<module>$': {bits, group_size, sym}) and dense Linears are excluded ('-:^<module>$'),
the first matching pattern winning as in GPTQModel. A quantized `lm_head` sets `lm_head: true`.

What the layout cannot hold is refused before anything is written, naming each path: the leaves
compressed-tensors refuses (NF4, fp8 and codebook codes, `LowRank`, `Shared`, `Masked`, quantized embeddings,
GPT-2's Conv1D), widths other than 2, 3, 4, 8 bits, sizes not multiples of 32 (the layout's shapes are
`in // 32 * b` and `out // 32 * b`), and zero points of 0 in v1. `dense_fallback=True` writes them dense.
An act-order checkpoint (a `g_idx` other than i // group_size) loads as a leaf holding that `g_idx`. Loading
refuses other formats (marlin, bitblas), pack dtypes other than int32 and adapters.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcompress import core
from jaxcompress.models import convert, packed
from jaxcompress.models.base import Model

QUANT_METHOD = 'gptq'
CHECKPOINT_FORMATS = ('gptq', 'gptq_v2')  # v1 stores zero points minus 1; v2 stores them as they are
BITS = (2, 3, 4, 8)
LAYOUT = 'GPTQ'
MASKED = 'GPTQ checkpoints hold no sparsity masks'
TENSORS = ('qweight', 'qzeros', 'scales', 'g_idx')


@dataclasses.dataclass(frozen=True)
class Scheme:
  """One Linear's GPTQ quantization: `bits`, groups of `group_size` inputs (None: per channel), `sym`, and the
  checkpoint format its zero points are stored in."""

  bits: int
  group_size: int | None
  sym: bool
  checkpoint_format: str = 'gptq'

  def fields(self) -> dict:
    """The scheme's fields as GPTQ's quantization_config (and a `dynamic` override) spell them."""
    return {'bits': self.bits, 'group_size': -1 if self.group_size is None else self.group_size, 'sym': self.sym}

  def stored_zero(self, zero: np.ndarray) -> np.ndarray:
    """Zero points as the checkpoint stores them (v1: minus 1)."""
    return zero - 1 if self.checkpoint_format == 'gptq' else zero


# Export -------------------------------------------------------------------------------------------------------


def _refusal(w: Any, row: convert.TensorMap, checkpoint_format: str) -> str | None:
  reason = packed.refusal(w, row, LAYOUT, MASKED)
  if reason is not None or not isinstance(w, core.Quantized):
    return reason
  if w.bits not in BITS:
    return (f'{w.bits}-bit codes: GPTQ kernels read {", ".join(map(str, BITS))} bits; compressed-tensors '
            "'pack-quantized' or core.serialize holds it")
  n_in, n_out = w.shape
  if n_in % 32 or n_out % 32:
    return (f'in_features={n_in}, out_features={n_out}: GPTQ packs along both in multiples of 32 '
            "(qweight [in // 32 * bits, out]); compressed-tensors 'pack-quantized' holds it")
  if checkpoint_format == 'gptq' and w.zero is not None and int(packed.host_zero(w).min()) == 0:
    return ("a zero point of 0: checkpoint_format='gptq' (v1) stores zero - 1 and cannot hold it; "
            "checkpoint_format='gptq_v2' does")
  return None


def refusals(model: Model, params: dict, checkpoint_format: str = 'gptq') -> dict[str, str]:
  """{path: why} for every leaf of `params` this layout cannot hold ({}: `export` writes it all packed)."""
  return packed.refusals(model, params, lambda w, row: _refusal(w, row, checkpoint_format))


def scheme_of(w: core.Quantized, checkpoint_format: str = 'gptq') -> Scheme:
  return Scheme(bits=w.bits, group_size=w.group_size, sym=w.zero is None, checkpoint_format=checkpoint_format)


def gptq_tensors(w: core.Quantized, module: str, checkpoint_format: str = 'gptq', dtype: Any = None
                 ) -> dict[str, np.ndarray]:
  """The GPTQ tensors of one Linear `module` from an int leaf [in, out]; `dtype` casts the scale."""
  scheme = scheme_of(w, checkpoint_format)
  codes = packed.host_codes(w)  # [in, out]
  n_in, n_out = codes.shape
  zero = packed.host_zero(w)
  if zero is None:
    zero = np.full((w.groups, n_out), 2 ** (w.bits - 1), np.uint8)
  group = n_in if w.group_size is None else w.group_size
  return {f'{module}.qweight': np.ascontiguousarray(packed.pack_int32(codes.T, w.bits).T),
          f'{module}.qzeros': packed.pack_int32(scheme.stored_zero(zero), w.bits),
          f'{module}.scales': np.ascontiguousarray(packed.host_scale(w, dtype)),
          f'{module}.g_idx': (np.arange(n_in) // group if w.g_idx is None else
                              np.asarray(jax.device_get(w.g_idx))).astype(np.int32)}


def quantization_config(schemes: dict[str, Scheme], dense: list[str], checkpoint_format: str,
                        desc_act: bool = False) -> dict:
  """config.json's GPTQ `quantization_config`: the most common scheme, the others as `dynamic` overrides and
  dense Linears excluded; desc_act: some Linear's groups follow act-order (a g_idx of its own)."""
  common = collections.Counter(schemes.values()).most_common(1)[0][0]
  dynamic = {f'-:^{re.escape(m)}$': {} for m in sorted(dense)}
  dynamic.update({f'+:^{re.escape(m)}$': s.fields() for m, s in schemes.items() if s != common})
  return {'quant_method': QUANT_METHOD, **common.fields(), 'desc_act': bool(desc_act), 'static_groups': False,
          'true_sequential': True, 'damp_percent': 0.01, 'checkpoint_format': checkpoint_format,
          'format': checkpoint_format, 'pack_dtype': 'int32', 'lm_head': any(m == 'lm_head' for m in schemes),
          'dynamic': dynamic or None}


def export(model: Model, params: dict, out_dir: str | os.PathLike, *, checkpoint_format: str = 'gptq',
           dense_fallback: bool = False, dtype: Any = None, max_shard_bytes: int = 4 << 30) -> Path:
  """Writes a GPTQ checkpoint directory (GPTQModel, transformers with optimum + gptqmodel, vLLM and
  `models.from_pretrained` read it): int `Quantized` Linear kernels as qweight / qzeros / scales / g_idx, the
  rest dense.

  checkpoint_format: 'gptq' (v1, zero points stored minus 1: read everywhere) or 'gptq_v2'.
  Leaves the layout cannot hold are refused before anything is written (a ValueError naming each path, its kind
  and a format that holds it); with `dense_fallback=True` they are written dense and excluded in `dynamic`.
  `dtype` casts the dense tensors and the scales (jnp.float16 gives GPTQ's usual scales).
  """
  return export_parts(model, [lambda: params], out_dir, checkpoint_format=checkpoint_format,
                      dense_fallback=dense_fallback, dtype=dtype, max_shard_bytes=max_shard_bytes)


def export_parts(model: Model, parts: Sequence[packed.Part], out_dir: str | os.PathLike, *,
                 checkpoint_format: str = 'gptq', dense_fallback: bool = False, dtype: Any = None,
                 max_shard_bytes: int = 4 << 30) -> Path:
  """`export` of a tree given as loaders of its disjoint parts (e.g. the blocks of an out-of-core compression,
  `calibration.compressed_parts`), holding one part in memory at a time (`packed.write`)."""
  if checkpoint_format not in CHECKPOINT_FORMATS:
    raise ValueError(f'gptq_format.export: checkpoint_format={checkpoint_format!r}; expected one of '
                     f'{CHECKPOINT_FORMATS}.')
  layout = packed.Layout(
      LAYOUT, check=lambda w, row: _refusal(w, row, checkpoint_format),
      tensors=lambda w, module: gptq_tensors(w, module, checkpoint_format, dtype),
      describe=lambda w: (scheme_of(w, checkpoint_format), w.g_idx is not None),
      config=lambda described, dense: quantization_config(
          {m: d[0] for m, d in described.items()}, dense, checkpoint_format,
          desc_act=any(d[1] for d in described.values())),
      empty='gptq_format.export: no Linear is an int Quantized leaf the GPTQ layout holds, so nothing was '
            'written; save a dense model with models.save_pretrained.')
  return packed.write(model, parts, out_dir, layout, who='gptq_format.export', dense_fallback=dense_fallback,
                      dtype=dtype, max_shard_bytes=max_shard_bytes)


# Import -------------------------------------------------------------------------------------------------------


def _read_fields(cfg_file: Path, where: str, q: dict, base: Scheme) -> Scheme:
  """`base` with the fields of `q` (the config or a `dynamic` override) that it sets, each checked."""
  at = lambda f: f'{where}{f}'
  bits = q.get('bits', base.bits)
  if bits not in BITS:
    raise packed.field_error(cfg_file, at('bits'), bits, f'one of {BITS}')
  group_size = q.get('group_size', -1 if base.group_size is None else base.group_size)
  if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
    raise packed.field_error(cfg_file, at('group_size'), group_size, '-1 (per channel) or a positive integer')
  sym = q.get('sym', base.sym)
  if not isinstance(sym, bool):
    raise packed.field_error(cfg_file, at('sym'), sym, 'true or false')
  for field, ok in (('pack_dtype', ('int32', None)), ('adapter', (None, {})), ('quant_method', (QUANT_METHOD,))):
    if field in q and q[field] not in ok:
      raise packed.field_error(cfg_file, at(field), q[field], ' or '.join(map(repr, ok)))
  return Scheme(bits=bits, group_size=None if group_size == -1 else group_size, sym=sym,
                checkpoint_format=base.checkpoint_format)


def read_plan(cfg: dict, cfg_file: Path, linear_modules: list[str], tensor_names) -> dict[str, Scheme]:
  """{Linear module name as the checkpoint spells it: its scheme} for every Linear that has a `qweight`, from
  config.json's GPTQ quantization_config. Any field this module cannot represent is a ValueError naming it."""
  q = cfg['quantization_config']
  fmt = q.get('checkpoint_format') or q.get('format') or 'gptq'
  if fmt not in CHECKPOINT_FORMATS:
    raise packed.field_error(cfg_file, 'checkpoint_format', fmt, f'one of {CHECKPOINT_FORMATS} (the packed layouts read '
                       'here; marlin and bitblas are kernel-specific repackings)')
  if q.get('desc_act') not in (None, False, True):
    raise packed.field_error(cfg_file, 'desc_act', q.get('desc_act'), 'true or false')
  base = _read_fields(cfg_file, '', q, Scheme(bits=4, group_size=128, sym=True, checkpoint_format=fmt))
  dynamic = q.get('dynamic') or {}
  if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
    raise packed.field_error(cfg_file, 'dynamic', dynamic, '{pattern: {field: value}}')
  plan = {}
  for module in linear_modules:
    if f'{module}.qweight' not in tensor_names:
      continue
    scheme = base
    for pattern, overrides in dynamic.items():  # GPTQModel's order: the first pattern that matches decides
      if re.match(pattern.removeprefix('-:').removeprefix('+:'), module):
        if pattern.startswith('-:'):
          raise packed.field_error(cfg_file, f'dynamic[{pattern!r}]', overrides, f"no exclusion of '{module}', whose "
                             'qweight the checkpoint holds')
        scheme = _read_fields(cfg_file, f'dynamic[{pattern!r}].', overrides, base)
        break
    plan[module] = scheme
  return plan


def read_quantized(scheme: Scheme, module: str, get: packed.Getter, shape: tuple[int, int],
                   scale_dtype: Any = None) -> core.Quantized:
  """The `Quantized` leaf [in, out] of one GPTQ Linear. get(tensor name) -> (array, file name); `shape` is the
  kernel shape the config implies. Tensors that disagree with it are a ValueError naming the file and tensor."""
  n_in, n_out = shape
  b = scheme.bits
  group = n_in if scheme.group_size is None else scheme.group_size
  if n_in % group:
    raise ValueError(f"'{module}': group_size={group} does not divide in_features={n_in}.")
  if n_in % 32 or n_out % 32:
    raise ValueError(f"'{module}': [{n_out}, {n_in}] is not a GPTQ layout (both sizes multiples of 32).")
  read = packed.checked_reader(module, get, f'the {b}-bit GPTQ layout and config.json')
  qweight = read('qweight', (n_in // 32 * b, n_out), 'i')
  qzeros = read('qzeros', (n_in // group, n_out // 32 * b), 'i')
  scale = read('scales', (n_in // group, n_out), 'f')
  g_idx = read('g_idx', (n_in,), 'iu').astype(np.int64)
  if g_idx.min() < 0 or g_idx.max() >= n_in // group:
    _, file = get(f'{module}.g_idx')
    raise ValueError(f"tensor '{module}.g_idx' in '{file}' names groups outside 0..{n_in // group - 1} (the rows "
                     'of its scales); the checkpoint is damaged.')
  contiguous = np.array_equal(g_idx, np.arange(n_in) // group)  # else act-order groups, kept as the leaf's g_idx
  codes = packed.unpack_int32(np.ascontiguousarray(qweight.T), b, n_in).T  # [in, out]
  stored = packed.unpack_int32(qzeros, b, n_out).astype(np.int64)  # [groups, out]
  zero = stored + 1 if scheme.checkpoint_format == 'gptq' else stored
  if zero.max() >= 2 ** b:
    _, file = get(f'{module}.qzeros')
    raise ValueError(f"tensor '{module}.qzeros' in '{file}' holds {b}-bit zero points {2 ** b - 1} in the v1 format "
                     f'(zero point {2 ** b}, outside the codes); the checkpoint is damaged or not v1.')
  if scale_dtype is not None:
    scale = scale.astype(scale_dtype)
  symmetric = scheme.sym and np.all(zero == 2 ** (b - 1))
  return packed.int_leaf(codes, scale, None if symmetric else zero.astype(scale.dtype), b, scheme.group_size,
                         None if contiguous or scheme.group_size is None else g_idx)
