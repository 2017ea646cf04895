"""Argument checks, leaf construction and `core.Masked` handling shared by the quantizers of this package."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import calibration, core
from jaxcompress.core import quantized as qlib

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
# what the methods that take dense or `core.Masked` kernels forbid (a registry `forbids=`)
DENSE_OR_MASKED = ('quantized', 'lowrank', 'shared', 'adapter')


def check_bits(bits, where: str) -> None:
  if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or int(bits) not in SUPPORTED_BITS:
    raise ValueError(f'{where}: bits={bits!r} is not supported; use an integer in 2..8.')


def check_group_size(group_size, rows: int, where: str) -> None:
  if group_size is None:
    return
  if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
    raise ValueError(f'{where}: group_size={group_size!r} must be a positive integer, or None for per-channel.')
  if rows % group_size:
    raise ValueError(f'{where}: group_size={group_size} does not divide the input dimension {rows}; pick a divisor '
                     f'of {rows} or group_size=None (one group per output column).')


def block_input_widths(model, params) -> dict[str, int]:
  """{path: input width} of every block linear (`model.block_structure`: kernels [in, out] and stacked experts
  [E, in, out]); params may be abstract (`model.abstract_params()`)."""
  out = {}
  for i in range(model.num_layers(params)):
    block = params[model.block_path][i]
    for group in model.block_structure(block):
      for k in group.kernels:
        out[f'{model.block_path}/{i}/{k}'] = int(core.shape_of(core.paths.get(block, k))[-2])
  return out


def _divisors_hint(widths, *, every: bool) -> str:
  """Group sizes to suggest: dividing every width (or some width), largest first."""
  g = math.gcd(*widths)
  fits = (lambda d: g % d == 0) if every else (lambda d: any(w % d == 0 for w in widths))
  picks = [d for d in (128, 64, 32, 16) if fits(d)][:2]
  return (f'{" or ".join(map(str, picks))}' if picks else str(g)) + (f' (a divisor of {g})' if every else '')


def check_group_size_fits(group_size, widths: dict[str, int]) -> None:
  """group_size divides every input width of `widths` ({path: width}), or a ValueError naming the first it does
  not and the fix (methods whose kernels all take groups: gptq, awq, mixed)."""
  if group_size is None or not widths:
    return
  bad = {p: w for p, w in sorted(widths.items()) if w % group_size}
  if bad:
    path, width = next(iter(bad.items()))
    hint = _divisors_hint(widths.values(), every=True)
    raise ValueError(f'group_size={group_size} does not divide the input width {width} of {path} ({len(bad)} of '
                     f'{len(widths)} kernels); give {hint}, or group_size=None (one group per output column).')


def check_group_size_used(group_size, widths: dict[str, int]) -> None:
  """group_size divides at least one input width of `widths` (methods that give a kernel it does not divide one
  group per output column: a group size dividing none would change nothing), or a ValueError with the fix."""
  if group_size is None or not widths or any(w % group_size == 0 for w in widths.values()):
    return
  hint = _divisors_hint(widths.values(), every=False)
  raise ValueError(f'group_size={group_size} divides none of the input widths {sorted(set(widths.values()))}, so '
                   f'every kernel would get one group per output column; give {hint}, or group_size=None to ask '
                   'for that.')


def check_rules(model, params, *, config) -> None:
  """The registry `check` of layer-wise quantizers: config.rules choose some block linear, or a ValueError
  naming the rules (before any weight is loaded; shapes only)."""
  calibration.chosen(model, params, model.selection_rules(config.rules), caller='')


def check_block_group_size(model, params, *, config) -> None:
  """The registry `check` of layer-wise quantizers grouping every block linear's rows by config.group_size:
  `check_rules`, and the group size divides the input width of each block linear."""
  check_rules(model, params, config=config)
  check_group_size_fits(config.group_size, block_input_widths(model, params))


def chosen_2d(model, params, rules: core.Rules, caller: str) -> list[tuple[int, str, tuple[int, ...]]]:
  """[(block index, linear path within the block, shape)] of the block linears `rules` choose (params may be
  abstract); a stacked expert weight among them is a ValueError naming it (`caller` quantizes [in, out] kernels)."""
  keep = calibration.chosen(model, params, rules, caller=caller)
  out = []
  for i, k in calibration.block_linears(model, params):
    if calibration.selection.rule_path(model, i, k) not in keep:
      continue
    shape = tuple(np.shape(core.paths.get(params[model.block_path][i], k)))
    if len(shape) != 2:
      raise ValueError(f'{caller}: block {i} {k} has shape {shape}; it quantizes 2-D kernels [in, out] only '
                       '(stacked experts: use gptq). Leave it out with exclude=.')
    out.append((i, k, shape))
  return out


def check_finite(a, name: str, where: str) -> None:
  a = np.asarray(a)
  if not np.isfinite(a).all():
    bad = int(np.size(a) - np.isfinite(a).sum())
    raise ValueError(f'{where}: {name} has {bad} NaN/inf entries; clean the weights or calibration data first.')


# one compiled program per shape instead of a few eager ops (each an XLA compile on its first call)
_pack_codes = jax.jit(qlib.pack_codes, static_argnums=1)


def make_leaf(codes, scale, zero, *, bits, group_size, shape, scale_dtype, pack=True, g_idx=None) -> core.Quantized:
  """Integer codes [in, out] uint8 and per-group scale / zero [G, out] -> a `core.Quantized` leaf (g_idx [in]:
  each input's group, for act-order groups; None: runs of group_size inputs)."""
  packed = bool(pack and qlib.packs(bits) and shape[0] % (8 // bits) == 0)
  if packed:
    codes = _pack_codes(codes, bits)
  return core.Quantized(codes=codes, scale=jnp.asarray(scale).astype(scale_dtype),
                        zero=None if zero is None else jnp.asarray(zero).astype(scale_dtype), bits=bits,
                        group_size=group_size, fmt='int', packed=packed, logical_shape=tuple(shape), g_idx=g_idx)


def through_masks(compress_block):
  """compress_block (as `calibration.run_sequential` calls it) over the kept values of the `core.Masked` kernels
  it compresses (those in its stats; pruned entries zero), with the masks put back on what it returns. Quantizing
  a pruned model so keeps its masks, and the blocks after are calibrated on the block as it will finally be
  (masked and quantized)."""
  def run(i, block, stats):
    flat = core.paths.flatten(block)  # only the kernels being compressed (their group's); the rest stay as they are
    masks = {p: flat[p].mask for p in stats if isinstance(flat.get(p), core.Masked)}
    if not masks:
      return compress_block(i, block, stats)
    out = compress_block(i, core.paths.replace(block, {p: flat[p].materialize() for p in masks}), stats)
    out_flat = core.paths.flatten(out)
    return core.paths.replace(out, {p: core.Masked(out_flat[p], m) for p, m in masks.items()})
  return run


def unmask(params):
  """(params with every `core.Masked` leaf materialized (pruned entries zero), {path: mask})."""
  flat = core.paths.flatten(params)
  masks = {p: w.mask for p, w in flat.items() if isinstance(w, core.Masked)}
  if not masks:
    return params, masks
  return core.paths.replace(params, {p: flat[p].materialize() for p in masks}), masks


def remask(params, masks):
  """The leaves at the paths of `masks` ({path: mask}, from `unmask`) wrapped in `core.Masked` again."""
  if not masks:
    return params
  flat = core.paths.flatten(params)
  return core.paths.replace(params, {p: core.Masked(flat[p], m) for p, m in masks.items()})


def masked_through(method):
  """A model-level quantizer `method(model, params, calib, *, config)` that also takes `core.Masked` kernels: it
  quantizes their kept values (pruned entries zero) and the masks go back around what it returns."""
  @functools.wraps(method)
  def apply(model, params, calib=None, **kwargs):
    dense, masks = unmask(params)
    model, out = method(model, dense, calib, **kwargs)
    return model, remask(out, masks)
  return apply


def dense_values(params):
  """`core.Masked` kernels with their pruned entries zeroed in the value (what a quantizer of a masked kernel
  sees); other leaves as they are."""
  dense, masks = unmask(params)
  return remask(dense, masks)
