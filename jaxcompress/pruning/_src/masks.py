"""The orthogonal axes of pruning: a score, a pattern, a distribution over layers (as jaxpruner separates them).

    score         an array like the weight, larger = more important (`magnitude_score`: |W|; Wanda: |W|·‖X_j‖₂)
    pattern       which entries compete: 'per_layer' (the whole matrix), 'per_output' (the inputs of each output
                  column), or 'N:M' (at most N kept in every M consecutive inputs of each output, e.g. '2:4')
    distribution  each layer's sparsity: 'uniform', 'erk' (Evci et al. 2020, ∝ (in + out) / (in·out)),
                  'global' (one threshold over every selected layer) plus per-layer `overrides`

Kernels are stored [in, out] (`x @ w`), so "per output" ranks along axis 0 and N:M groups run along axis 0.
A mask is bool, True = kept. `prune` returns the params with `core.Masked` leaves at the selected paths.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core

PATTERNS = ('per_layer', 'per_output')
DISTRIBUTIONS = ('uniform', 'erk', 'global')


def check_sparsity(sparsity: float, *, caller: str) -> float:
  """sparsity as a float in [0, 1); anything else is refused with the fix."""
  s = float(sparsity)
  if not (0.0 <= s < 1.0) or math.isnan(s):
    raise ValueError(f'{caller}: sparsity={sparsity!r} must be in [0, 1) (the fraction of weights set to zero; '
                     'e.g. 0.5).')
  return s


def parse_pattern(pattern: str | None, *, caller: str = 'prune') -> str | tuple[int, int]:
  """'per_layer' | 'per_output' | (n, m) from a pattern string; None means 'per_layer'. Errors start with
  `caller` (none where it is '': a config's own check, which the registry prefixes with the method)."""
  where = f'{caller}: ' if caller else ''
  if pattern is None or pattern == 'unstructured':
    return 'per_layer'
  if pattern in PATTERNS:
    return pattern
  m = re.fullmatch(r'\s*(\d+)\s*:\s*(\d+)\s*', str(pattern))
  if not m:
    raise ValueError(f"{where}pattern={pattern!r} is not one of {PATTERNS + ('unstructured',)} or 'N:M' "
                     "(e.g. '2:4').")
  n, mm = int(m.group(1)), int(m.group(2))
  if not 0 < n < mm:
    raise ValueError(f'{where}pattern={pattern!r} needs 0 < N < M (N kept of every M inputs); e.g. 2:4.')
  return n, mm


def check_nm(in_features: int, nm: tuple[int, int], *, caller: str, path: str = '') -> None:
  if in_features % nm[1]:
    where = f' ({path})' if path else ''
    raise ValueError(f'{caller}: N:M {nm[0]}:{nm[1]} needs the input dimension{where} divisible by M={nm[1]}, '
                     f'got {in_features}; choose an M dividing it or exclude that layer.')


def n_pruned(sparsity: float, size: int) -> int:
  """How many of `size` entries a sparsity prunes (nearest integer)."""
  return int(round(sparsity * size))


def _sortable(x: jax.Array) -> jax.Array:
  """uint32 keys ordered as the float32 values x (the usual sign-flip of the IEEE bits)."""
  x = x.astype(jnp.float32)
  x = jnp.where(x == 0, jnp.zeros((), jnp.float32), x)  # -0.0 ties with 0.0, as in a sort
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _prune_smallest(scores: jax.Array, k, axis: int | None) -> jax.Array:
  """Mask keeping all but the k smallest scores (along axis, or over the whole array), exactly k pruned; ties
  are pruned in index order, as a stable sort would. The k-th key is found by bisection (32 counting passes),
  which on CPU is far cheaper than sorting a large kernel; k may be traced. One compiled program per shape
  (called eagerly, its few dozen operations would each compile on their own)."""
  if isinstance(k, (int, np.integer)):
    if k <= 0:
      return jnp.ones(scores.shape, bool)
    k = np.uint32(k)
  return _prune_smallest_compiled(scores, k, axis=axis)


@functools.partial(jax.jit, static_argnames='axis')
def _prune_smallest_compiled(scores: jax.Array, k, *, axis: int | None) -> jax.Array:
  flat = axis is None
  keys = _sortable(scores.reshape(-1) if flat else jnp.moveaxis(scores, axis, 0))
  k = jnp.asarray(k, jnp.uint32)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(keys <= mid, axis=0, dtype=jnp.uint32) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  shape = keys.shape[1:]
  lo, _ = jax.lax.fori_loop(0, 32, step, (jnp.zeros(shape, jnp.uint32), jnp.full(shape, 0xFFFFFFFF, jnp.uint32)))
  below = keys < lo
  ties = keys == lo
  room = k - jnp.sum(below, axis=0, dtype=jnp.uint32)
  pruned = below | (ties & (jnp.cumsum(ties, axis=0, dtype=jnp.uint32) <= room))
  pruned = jnp.where(k > 0, pruned, False)
  return ~(pruned.reshape(scores.shape) if flat else jnp.moveaxis(pruned, 0, axis))


def nm_mask(scores: jax.Array, n: int, m: int) -> jax.Array:
  """scores [in, out] -> mask keeping the n largest of every m consecutive inputs of each output column."""
  in_features = scores.shape[0]
  check_nm(in_features, (n, m), caller='nm_mask')
  groups = scores.reshape(in_features // m, m, *scores.shape[1:])
  return _prune_smallest(groups, m - n, axis=1).reshape(scores.shape)


def mask_from_scores(scores: jax.Array, sparsity: float, pattern: str | None = None) -> jax.Array:
  """bool mask [in, out] (True = kept) from scores [in, out] under a pattern; N:M ignores sparsity."""
  p = parse_pattern(pattern, caller='mask_from_scores')
  if isinstance(p, tuple):
    return nm_mask(scores, *p)
  sparsity = check_sparsity(sparsity, caller='mask_from_scores')
  if p == 'per_output':
    if scores.ndim < 2:
      return _prune_smallest(scores, n_pruned(sparsity, scores.size), axis=None)
    return _prune_smallest(scores, n_pruned(sparsity, scores.shape[0]), axis=0)
  return _prune_smallest(scores, n_pruned(sparsity, scores.size), axis=None)


# Scores -------------------------------------------------------------------------------------------------------


def magnitude_score(path: str, w: Any) -> jax.Array:
  """|W| (float32), the classic score (Han et al. 2015)."""
  del path
  return jnp.abs(core.materialize(w).astype(jnp.float32))


# Distributions ------------------------------------------------------------------------------------------------


def erk_sparsities(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
  """Erdős–Rényi-Kernel sparsities (Evci et al. 2020): density ∝ Σ dims / Π dims, scaled so the selected
  layers together reach `sparsity`; layers that would exceed density 1 are kept dense and the rest rescaled."""
  sizes = {p: math.prod(s) for p, s in shapes.items()}
  raw = {p: sum(s) / math.prod(s) for p, s in shapes.items()}
  dense: set[str] = set()
  total_keep = (1 - sparsity) * sum(sizes.values())
  while True:
    free = [p for p in shapes if p not in dense]
    budget = total_keep - sum(sizes[p] for p in dense)
    denom = sum(raw[p] * sizes[p] for p in free)
    eps = budget / denom if denom else 0.0
    over = [p for p in free if eps * raw[p] > 1]
    if not over:
      break
    dense.update(over)
  return {p: 0.0 if p in dense else float(min(max(1 - eps * raw[p], 0.0), 0.999999)) for p in shapes}


def layer_sparsities(shapes: Mapping[str, tuple[int, ...]], sparsity: float, distribution: str,
                     overrides: Mapping[str, float] | None = None) -> dict[str, float]:
  """{path: sparsity} for each selected layer. overrides: {regex: sparsity}, applied last (a later match wins)."""
  if distribution not in ('uniform', 'erk'):
    raise ValueError(f'layer_sparsities: distribution={distribution!r} must be one of {DISTRIBUTIONS}.')
  out = (erk_sparsities(shapes, sparsity) if distribution == 'erk' else {p: sparsity for p in shapes})
  return apply_overrides(out, overrides)


def apply_overrides(sparsities: Mapping[str, float], overrides: Mapping[str, float] | None) -> dict[str, float]:
  """{path: sparsity} with each override {regex: sparsity} replacing the value of the paths it matches (in order,
  so the last matching regex wins)."""
  out = dict(sparsities)
  for regex, s in (overrides or {}).items():
    check_sparsity(s, caller=f'prune overrides[{regex!r}]')
    for p in out:
      if re.search(regex, p):
        out[p] = float(s)
  return out


# prune --------------------------------------------------------------------------------------------------------

Scores = Mapping[str, jax.Array] | Callable[[str, Any], jax.Array]


def prune(params: Any, scores: Scores = magnitude_score, *, sparsity: float, pattern: str | None = None,
          distribution: str = 'uniform', selection: core.Rules | core.Selection | None = None,
          overrides: Mapping[str, float] | None = None) -> Any:
  """params with each selected kernel replaced by `core.Masked(value=w, mask)`, mask from its scores.

  scores: {path: [in, out] scores} or a function (path, weight) -> scores (default `magnitude_score`).
  sparsity: the fraction pruned, in [0, 1) (ignored for N:M patterns, which prune 1 - N/M).
  pattern: 'per_layer' (default), 'per_output', or 'N:M' along the input dimension.
  distribution: 'uniform' | 'erk' | 'global' (one threshold over all selected layers; needs 'per_layer').
  selection: `core.Rules` or a `core.Selection` (default: every block kernel, `core.select(params)`).
  overrides: {path regex: sparsity} replacing the distribution's value for matching layers.
  """
  sparsity = check_sparsity(sparsity, caller='prune')
  p = parse_pattern(pattern)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f'prune: distribution={distribution!r} must be one of {DISTRIBUTIONS}.')
  if selection is None:
    sel = core.select(params)
  elif isinstance(selection, core.Rules):
    sel = core.select_by(params, selection)
  else:
    sel = selection
  if not len(sel):
    raise ValueError(f'prune: the selection matches no weight ({selection!r}); check its include/exclude '
                     'regexes against core.select(params) or model.select(params).')
  weights = sel.get(params)
  score_of = (lambda path, w: jnp.asarray(scores[path])) if isinstance(scores, Mapping) else scores
  if isinstance(scores, Mapping):
    missing = [q for q in sel if q not in scores]
    if missing:
      raise KeyError(f'prune: no scores for {missing[:3]}; give scores for every selected path.')
  layer_scores = {q: score_of(q, w) for q, w in weights.items()}
  if isinstance(p, tuple):
    for q, s in layer_scores.items():
      check_nm(s.shape[0], p, caller='prune', path=q)
    masks = {q: nm_mask(s, *p) for q, s in layer_scores.items()}
  elif distribution == 'global':
    if p != 'per_layer' or overrides:
      raise ValueError("prune: distribution='global' compares every selected weight at once; use it with "
                       "pattern='per_layer' and no overrides.")
    flat = jnp.concatenate([s.reshape(-1) for s in layer_scores.values()])
    mask = _prune_smallest(flat, n_pruned(sparsity, flat.size), axis=None)
    masks, start = {}, 0
    for q, s in layer_scores.items():
      masks[q] = mask[start:start + s.size].reshape(s.shape)
      start += s.size
  else:
    per_layer = layer_sparsities({q: tuple(s.shape) for q, s in layer_scores.items()}, sparsity, distribution,
                                 overrides)
    masks = {q: mask_from_scores(s, per_layer[q], p) for q, s in layer_scores.items()}
  return sel.map(lambda q, w: core.Masked(value=_unmasked(w), mask=masks[q]), params)


def _unmasked(w: Any) -> Any:
  """A weight to wrap: an existing Masked's value (its old zeros stay zero through its materialized value)."""
  if isinstance(w, core.Masked):
    return core.materialize(w)
  return w


def sparsity_of(params: Any, selection: core.Selection | None = None) -> float:
  """Fraction of zero entries over the selected kernels (materialized; host-side)."""
  sel = selection if selection is not None else core.select(params)
  zeros = total = 0
  for w in sel.get(params).values():
    dense = np.asarray(core.materialize(w))
    zeros += int(np.sum(dense == 0))
    total += dense.size
  return zeros / max(total, 1)
