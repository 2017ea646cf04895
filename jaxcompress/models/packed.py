"""What the quantized checkpoint layouts (`compressed_tensors`, `gptq_format`) share: int codes packed into int32
bit streams, the check of which leaves a layout can hold (refused before anything is written), the export loop
over a family's table, and the `Quantized` leaf a load builds from unpacked codes.

Packing: `pack_int32(codes [rows, cols], bits)` writes each row as one little-endian bit stream, code i at bits
i*bits ... i*bits+bits-1 of the row's words (codes straddle words when 32 % bits != 0). compressed-tensors packs
a Linear's [out, in] codes along `in` this way; GPTQ packs `qweight` along `in` and `qzeros` along `out`, the same
stream per column (AutoGPTQ's 3-bit packer spills codes 10 and 21 of every 32 across words exactly so).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxcompress import core
from jaxcompress.core import quantized as quantized_lib
from jaxcompress.models import convert, hf
from jaxcompress.models.base import Model

# get(tensor name) -> (array, the file holding it): how a layout's reader asks the loader for a tensor.
Getter = Callable[[str], tuple[np.ndarray, str]]


def _row_codes(words: int, bits: int) -> int:
  """Codes per row that cover `words` int32 words in whole runs of eight (eight codes fill `bits` bytes), so that
  each row's stream starts on a byte of `core.serialize.pack_bits`'s flat stream."""
  return 8 * math.ceil(math.ceil(words * 32 / bits) / 8)


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes [rows, cols] < 2**bits -> int32 [rows, ceil(cols * bits / 32)]: each row one little-endian
  bit stream, code i at bits i*bits ... (compressed-tensors' `pack_to_int32` of the signed codes): the rows,
  padded with zero codes, through `core.serialize.pack_bits`, each cut to its words."""
  codes = np.asarray(codes, np.uint8)
  rows, cols = codes.shape
  words = math.ceil(cols * bits / 32)
  width = _row_codes(words, bits)
  padded = np.zeros((rows, width), np.uint8)
  padded[:, :cols] = codes
  stream = core.serialize.pack_bits(padded, bits).reshape(rows, width * bits // 8)[:, :words * 4]
  return np.ascontiguousarray(stream).view('<i4').astype(np.int32).reshape(rows, words)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
  """Inverse of `pack_int32`: int32 [rows, words] -> uint8 [rows, cols]."""
  packed = np.ascontiguousarray(packed, dtype='<i4')
  rows, words = packed.shape
  width = _row_codes(words, bits)
  stream = np.zeros((rows, width * bits // 8), np.uint8)
  stream[:, :words * 4] = packed.view(np.uint8).reshape(rows, words * 4)
  return core.serialize.unpack_bits(stream, bits, rows * width).reshape(rows, width)[:, :cols]


def pack_bytes(codes: np.ndarray, bits: int) -> np.ndarray:
  """`core.quantized.pack_codes` on the host: uint8 [in, out] -> [in * bits // 8, out], low bits first along `in`
  (8 % bits == 0), so a load compiles nothing."""
  per = 8 // bits
  grouped = np.asarray(codes, np.uint8).reshape(codes.shape[0] // per, per, *codes.shape[1:])
  shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, per, *([1] * (codes.ndim - 1)))
  return np.bitwise_or.reduce(grouped << shifts, axis=1).astype(np.uint8)


def field_error(cfg_file: Path, field: str, value: Any, expected: str) -> ValueError:
  """The error for a `quantization_config` field a layout's reader cannot represent."""
  return ValueError(f'{cfg_file}: quantization_config.{field} = {value!r} cannot be loaded as jaxcompress leaves; '
                    f'expected {expected}.')


# Export -------------------------------------------------------------------------------------------------------


def kind(w: Any) -> str:
  """How a refusal names a leaf's kind."""
  if isinstance(w, core.Quantized):
    return f"Quantized(fmt='{w.fmt}', bits={w.bits})"
  return type(w).__name__ if core.is_compressed(w) else 'dense'


def host_codes(w: core.Quantized) -> np.ndarray:
  """The leaf's unpacked codes, uint8 [in, out], on the host."""
  return np.asarray(jax.device_get(w.codes_unpacked()), np.uint8)


def host_zero(w: core.Quantized) -> np.ndarray | None:
  """The leaf's zero points, uint8 [groups, out] (checked integral by `refusal`), or None (symmetric)."""
  return None if w.zero is None else np.asarray(jax.device_get(w.zero), np.float64).astype(np.uint8)


def host_scale(w: core.Quantized, dtype: Any = None) -> np.ndarray:
  """The leaf's scale [groups, out] on the host, cast to `dtype` if given."""
  return np.asarray(jax.device_get(w.scale if dtype is None else w.scale.astype(dtype)))


def refusal(w: Any, row: convert.TensorMap, layout: str, masked: str, formats: tuple[str, ...] = ('int',)
            ) -> str | None:
  """Why the leaf at a table row cannot be written in a packed `layout` holding `Quantized` leaves of `formats`
  (None: it can, packed or dense). `masked` says why the layout holds no `Masked` leaf."""
  if isinstance(w, core.Shared):
    return f'shared storage: {layout} stores every tensor once per module; core.serialize keeps it shared'
  if isinstance(w, core.Masked):
    return f'a sparsity mask: {masked}; core.serialize holds it'
  if isinstance(w, core.ActQuantized):
    return (f'its input activations rounded ({"static" if w.static else "per token"}): {layout} holds weights only; compressed-tensors '
            "'int-quantized' (the 'full' grid, act_quant(grid='full')) or core.serialize holds it")
  if not isinstance(w, core.Quantized):
    return None if not core.is_compressed(w) else f'no {layout} format holds it; core.serialize does'
  if w.fmt not in formats:
    other = {'fp8': "compressed-tensors ('naive-quantized', 'float-quantized') or core.serialize",
             'nf4': 'core.serialize or the bitsandbytes NF4 layout'}.get(w.fmt, 'core.serialize')
    held = ' and '.join(f"'{f}'" for f in formats)
    return f"'{w.fmt}' codes: {layout} holds {held} codes only; {other} holds it"
  if len(w.shape) != 2:
    return f'a stacked expert weight [E, in, out]: {layout} packs 2-D Linear weights here; core.serialize holds it'
  if not row.linear or len(row.ours) != 1:
    return ("groups along this tensor's first axis, which is not a torch Linear's input axis (embedding, GPT-2 "
            f"Conv1D or fused qkv); {layout} quantizes Linear weights along `in`; core.serialize holds it")
  if w.zero is not None:
    z = np.asarray(jax.device_get(w.zero), np.float64)
    if not (np.all(z == np.round(z)) and z.min() >= 0 and z.max() < 2 ** w.bits):
      return (f'zero points that are not integers in [0, {2 ** w.bits}); {layout} stores integer zero points; '
              'core.serialize holds it')
  return None


def refusals(model: Model, params: dict, check: Callable[[Any, convert.TensorMap], str | None],
             rows: Sequence[convert.TensorMap] | None = None) -> dict[str, str]:
  """{path: 'path: kind, why'} for every leaf of `params` that `check(leaf, table row)` refuses (over `rows`,
  default the family's whole table)."""
  raw = core.flatten({k: v for k, v in params.items() if k != core.SHARED})
  return {p: f'{p}: {kind(raw[p])}, {reason}' for row in (model.hf_table() if rows is None else rows)
          for p in row.ours if (reason := _online(model, p, raw[p]) or check(raw[p], row)) is not None}


def _online(model: Model, path: str, w: Any) -> str | None:
  """Why a compressed kernel stored in a model's online-rotated basis (`hf.plain_weight`) cannot be packed."""
  n = hf.online_block(model, path)
  if n and core.is_compressed(w):
    return (f'stored as Qᵀ·W for the online Hadamard of its input (online_hadamard={n}), which Hugging Face models do not '
            'apply: its codes hold no plain weight (compressed.jxc keeps it; dense_fallback writes Q·(Qᵀ·W))')
  return None


def _raise_refused(who: str, layout: str, refused: dict[str, str], rounded: list[str], dense_fallback: bool) -> None:
  """The one ValueError naming every refused leaf (or, with dense_fallback, every one that rounds its inputs)."""
  unwrap = ('Unwrap them first (jax.tree.map(lambda w: w.w if isinstance(w, core.ActQuantized) else w, params, '
            'is_leaf=core.is_weight_leaf)) to export the weights alone.')
  if rounded and dense_fallback:
    raise ValueError(f'{who}: dense_fallback=True would write these weights dense without the rounding of their '
                     'inputs, a different function, so nothing was written:\n  ' + '\n  '.join(rounded) +
                     '\n' + unwrap)
  if refused and not dense_fallback:
    tail = (f'\nThe {len(rounded)} ActQuantized leaves cannot be written dense either (the rounding of their inputs '
            f'would be lost): {unwrap}') if rounded else ''
    raise ValueError(f'{who}: {len(refused)} weights cannot be written in the {layout} format, so nothing was '
                     'written:\n  ' + '\n  '.join(refused.values()) + '\nPass dense_fallback=True to write them '
                     "dense (their Linears left unquantized in the config), or save the tree with "
                     'core.serialize.save.' + tail)


# Loads one part of a params tree: a sub-tree such as {'layers': {3: block}} or {'embed': ..., 'lm_head': ...}.
Part = Callable[[], dict]


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one packed checkpoint layout writes a tree: `check(leaf, row)` -> why it cannot hold the leaf (None: it
  can); `tensors(leaf, module)` -> the packed tensors of a Linear; `describe(leaf)` -> what its config needs of it
  (a scheme); `config(described {module: description}, dense Linear modules)` -> config.json's
  `quantization_config`. `empty`: the error when no Linear is packed (None: a dense-only checkpoint is fine)."""

  name: str
  check: Callable[[Any, convert.TensorMap], str | None]
  tensors: Callable[[Any, str], dict[str, np.ndarray]]
  describe: Callable[[Any], Any]
  config: Callable[[dict[str, Any], list[str]], dict]
  empty: str | None = None


def write(model: Model, parts: Sequence[Part], out_dir: str | os.PathLike, layout: Layout, *, who: str,
          dense_fallback: bool = False, dtype: Any = None, max_shard_bytes: int = 4 << 30) -> Path:
  """Writes a packed checkpoint of the tree whose disjoint `parts` together make the whole params, one part in
  memory at a time, in one pass: each part is loaded once, checked (shapes, and every leaf the layout refuses)
  and its tensors written as shards at once (`hf.ShardWriter`, under temporary names). Once a part holds a leaf
  the layout refuses (without `dense_fallback`), the remaining parts are only checked; then one ValueError names
  every refused leaf and the shards written are removed, so a refused export leaves the directory as it was.
  Peak memory: about one part and its tensors. `parts=[lambda: params]` exports a tree in memory."""
  expected = {p: tuple(s.shape) for p, s in core.flatten(model.abstract_params()).items()}
  refused: dict[str, str] = {}
  rounded: list[str] = []
  seen: set[str] = set()
  any_packed = False
  writer = hf.ShardWriter(out_dir, model, max_shard_bytes)
  described: dict[str, Any] = {}
  dense: list[str] = []
  try:
    for load in parts:
      params = load()
      if core.SHARED in params and len(parts) > 1:
        raise ValueError(f'{who}: shared storage ({core.SHARED}) spans the parts of a streamed export; export the '
                         'tree in memory.')
      flat = core.flatten(core.resolve(params))
      hf.check_export_shapes(model, flat, who, partial=True)
      rows = _rows(model, flat, who)
      found = refusals(model, params, layout.check, rows)
      refused.update(found)
      rounded += [why for p, why in found.items() if isinstance(flat[p], core.ActQuantized)]
      any_packed = any_packed or any(packable(flat[row.ours[0]]) and row.ours[0] not in found for row in rows)
      seen.update(flat)
      if not rounded and (dense_fallback or not refused):  # else the export will be refused: check the rest only
        tensors, packed_leaves, dense_part = export_tensors(model, flat, set(found), dtype, layout.tensors, rows)
        writer.add(tensors)
        described.update({module: layout.describe(w) for module, w in packed_leaves.items()})
        dense += dense_part
        del tensors, packed_leaves
      del params, flat
    missing = sorted(set(expected) - seen)
    if missing:
      raise KeyError(f"{who}: params lack {missing[:4]}{' ...' if len(missing) > 4 else ''}, which the config "
                     'implies.')
    _raise_refused(who, layout.name, refused, rounded, dense_fallback)
    if layout.empty and not any_packed:
      raise ValueError(layout.empty)
  except BaseException:
    writer.abort()
    raise
  return writer.close({'quantization_config': layout.config(described, dense)})


def packable(w: Any) -> bool:
  """Whether a leaf is a `Quantized` one a layout packs, bare or inside an `ActQuantized`."""
  return isinstance(w.w if isinstance(w, core.ActQuantized) else w, core.Quantized)


def _rows(model: Model, flat: dict, who: str) -> list[convert.TensorMap]:
  """The table rows whose parameters are in `flat` (a row with only some of them is an error)."""
  rows = []
  for row in model.hf_table():
    held = [p in flat for p in row.ours]
    if all(held):
      rows.append(row)
    elif any(held):
      raise ValueError(f'{who}: a part holds {[p for p in row.ours if p in flat]} without '
                       f'{[p for p in row.ours if p not in flat]}, which {row.hf} is written from; keep them in '
                       'one part.')
  return rows


def export_tensors(model: Model, flat: dict, refused: set[str], dtype: Any,
                   write: Callable[[Any, str], dict[str, np.ndarray]],
                   rows: Sequence[convert.TensorMap] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
  """(tensors, {module: leaf} written packed, Linear modules written dense) over `rows` (default the family's
  table): each int `Quantized` Linear (bare, or inside an `ActQuantized` the layout's check let through) not
  refused through write(leaf, module name), every other row dense (cast to `dtype`)."""
  tensors: dict[str, np.ndarray] = {}
  quantized: dict[str, Any] = {}
  dense: list[str] = []
  for row in (model.hf_table() if rows is None else rows):
    w = flat[row.ours[0]]
    if packable(w) and not any(p in refused for p in row.ours):
      module = hf.export_name(model, row.hf).removesuffix('.weight')
      tensors.update(write(w, module))
      quantized[module] = w
      continue
    if row.linear:
      dense.append(hf.export_name(model, row.hf).removesuffix('.weight'))
    tensors.update(hf.dense_tensor(model, row, flat, dtype))
  return tensors, quantized, dense


# Import -------------------------------------------------------------------------------------------------------


def checked_reader(module: str, get: Getter, what: str) -> Callable[[str, tuple, str], np.ndarray]:
  """read(suffix, shape, dtype kinds) -> tensor '<module>.<suffix>', or a ValueError naming the tensor, its file,
  and the shape `what` (e.g. 'the 4-bit scheme and config.json') implies."""
  def read(suffix: str, want: tuple, kinds: str) -> np.ndarray:
    arr, file = get(f'{module}.{suffix}')
    if tuple(arr.shape) != tuple(want) or arr.dtype.kind not in kinds:
      raise ValueError(f"tensor '{module}.{suffix}' in '{file}' is {arr.dtype} {list(arr.shape)}; {what} "
                       f'imply {list(want)} ({kinds!r} dtype kinds).')
    return arr
  return read


def int_leaf(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int,
             group_size: int | None, g_idx: np.ndarray | None = None) -> core.Quantized:
  """The `Quantized` leaf of host codes uint8 [in, out], scale [groups, out] and zero points [groups, out] (or
  None), packed two or more to a byte where the width allows, placed with device_put (nothing compiled); g_idx
  [in] int32: each input's group (act-order), None for runs of group_size inputs."""
  n_in, n_out = codes.shape
  packed = quantized_lib.packs(bits) and n_in % (8 // bits) == 0
  codes = pack_bytes(codes, bits) if packed else np.ascontiguousarray(codes)
  return core.Quantized(codes=jax.device_put(codes), scale=jax.device_put(np.ascontiguousarray(scale)),
                        zero=None if zero is None else jax.device_put(np.ascontiguousarray(zero)), bits=bits,
                        group_size=group_size, fmt='int', packed=packed, logical_shape=(n_in, n_out),
                        g_idx=None if g_idx is None else jax.device_put(np.asarray(g_idx, np.int32)))
