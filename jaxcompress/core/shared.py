"""`Shared`: one stored tensor used in several places (cross-layer sharing, tied embeddings).

A parameter tree holds shared storage once, under the top-level key `SHARED` ("_shared"), and a `Shared(name)`
reference at every place that uses it. `resolve(params)` swaps each reference for its storage. Models call it
at the top of `apply`, so autodiff sums the gradients of every use into the one stored tensor, and size
accounting counts the bytes once.

    params = tie(params, ['layers/0/mlp/up_proj/kernel', 'layers/1/mlp/up_proj/kernel'], name='up')
    params['layers'][1]['mlp']['up_proj']['kernel']   # Shared(name='up', ...)
    params['_shared']['up']                           # the array, stored once
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import paths as paths_lib
from jaxcompress.core import serialize

SHARED = '_shared'


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Shared(leaf_lib.Compressed):
  """A reference to `params['_shared'][name]`: no arrays of its own, so it costs no bytes."""

  name: str = leaf_lib.static()
  ref_shape: tuple[int, ...] = leaf_lib.static()
  ref_dtype: str = leaf_lib.static()

  @property
  def shape(self):
    return self.ref_shape

  @property
  def dtype(self):
    return np.dtype(self.ref_dtype)

  def materialize(self):
    raise ValueError(f"Shared('{self.name}') is a reference; call jaxcompress.core.resolve(params) on the whole "
                     'tree first (models do this in apply).')

  def matmul(self, x):
    return self.materialize()

  def stored_params(self):
    return 0

  def memory_bytes(self):
    return 0

  def disk_bytes(self):
    return 0

  def matmul_flops(self):
    return 0  # counted by core.stats from the storage it points to


# A reference stores no tensors: its storage is written once, under '_shared/<name>'.
serialize.register(
    'shared', Shared,
    lambda w, out: {'name': w.name, 'shape': list(w.shape), 'dtype': w.ref_dtype},
    lambda desc, src: Shared(name=desc['name'], ref_shape=tuple(desc['shape']), ref_dtype=desc['dtype']))


def reference(name: str, w: leaf_lib.Weight) -> Shared:
  return Shared(name=name, ref_shape=leaf_lib.shape_of(w), ref_dtype=str(leaf_lib.dtype_of(w)))


def storage(params: dict) -> dict:
  return params.get(SHARED, {}) if isinstance(params, dict) else {}


def resolve(params: Any) -> Any:
  """Each `Shared` reference replaced by its storage; the `_shared` entry removed. Idempotent."""
  if not isinstance(params, dict) or SHARED not in params:
    return params
  store = params[SHARED]

  def swap(path, x):
    if not isinstance(x, Shared):
      return x
    if x.name not in store:
      raise KeyError(f"Shared reference at '{path}' names storage '{x.name}', which params['{SHARED}'] lacks "
                     f'(it has {sorted(store)}).')
    return store[x.name]

  rest = {k: v for k, v in params.items() if k != SHARED}
  # References may sit inside other leaves too (a LoRA adapter over a shared base), so descend into them.
  return jax.tree_util.tree_map_with_path(lambda kp, x: swap(paths_lib.path_str(kp), x), rest,
                                          is_leaf=lambda x: isinstance(x, Shared))


def resolve_leaf(x: Any, store: dict) -> Any:
  """One weight with every reference in it (itself, or inside it, e.g. a LoRA's base) swapped for `store`'s."""
  return jax.tree.map(lambda y: store[y.name] if isinstance(y, Shared) else y, x,
                      is_leaf=lambda y: isinstance(y, Shared))


def tie(params: dict, paths: Sequence[str], name: str, value: leaf_lib.Weight | None = None) -> dict:
  """Stores `value` (default: the weight at paths[0]) once under `name` and points every path at it."""
  if not paths:
    raise ValueError('tie: paths is empty; name at least one parameter path to share.')
  flat = paths_lib.flatten(params)
  missing = [p for p in paths if p not in flat]
  if missing:
    raise KeyError(f'tie: no parameter at {missing}; paths look like {next(iter(flat), "?")!r}.')
  value = flat[paths[0]] if value is None else value
  for p in paths:
    if leaf_lib.shape_of(flat[p]) != leaf_lib.shape_of(value):
      raise ValueError(f"tie: '{p}' has shape {leaf_lib.shape_of(flat[p])}, the shared value "
                       f'{leaf_lib.shape_of(value)}; only same-shaped weights can share storage.')
  if name in storage(params):
    raise ValueError(f"tie: shared storage '{name}' already exists; choose another name.")
  ref = reference(name, value)
  out = paths_lib.replace(params, {p: ref for p in paths})
  return {**out, SHARED: {**storage(params), name: value}}


def count_uses(params: dict) -> dict[str, int]:
  """How many references point at each shared tensor."""
  uses: dict[str, int] = {}
  for x in jax.tree.leaves(params, is_leaf=leaf_lib.is_weight_leaf):
    if isinstance(x, Shared):
      uses[x.name] = uses.get(x.name, 0) + 1
  return uses
