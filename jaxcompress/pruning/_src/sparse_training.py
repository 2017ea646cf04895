"""Sparse training with fixed masks: pruned weights stay exactly zero while the rest are trained.

Two pieces, used together (`masks`: {parameter path: bool array of that parameter's shape}):
  masked_optimizer(tx, masks)  the optimizer's updates are zero where a mask is False (masks in its state);
  keep_masks(masks)            a Transform that zeroes those entries of the parameters after every update, so
                               nothing (weight decay, a dense starting point) can make them non-zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcompress import core
from jaxcompress.train import transforms


def mask_tree(params: Any, masks: Mapping[str, jax.Array], *, caller: str) -> Any:
  """A tree like params: bool arrays where masks has the path, None elsewhere; unknown paths are refused."""
  flat = core.flatten(params)
  unknown = sorted(set(masks) - set(flat))
  if unknown:
    raise KeyError(f'{caller}: no parameter at {unknown[:3]}; mask paths must name parameters '
                   '(e.g. "layers/0/mlp/up_proj/kernel").')
  for path, m in masks.items():
    if tuple(jnp.shape(m)) != tuple(core.shape_of(flat[path])):
      raise ValueError(f'{caller}: the mask for {path} has shape {tuple(jnp.shape(m))}, the parameter '
                       f'{tuple(core.shape_of(flat[path]))}; give a mask of the parameter\'s shape.')
  return core.map_with_path(lambda p, x: None if p not in masks else jnp.asarray(masks[p], bool), params)


def _apply(tree: Any, masks: Any) -> Any:
  """tree with entries zeroed where masks (a `mask_tree`) is False."""
  # masks is a prefix of tree: a None stands for a whole leaf of tree, compressed ones included.
  return jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)), masks, tree,
                      is_leaf=lambda x: x is None)


class MaskState(NamedTuple):
  masks: Any  # tree like the trainable params: bool arrays where masked, None elsewhere
  inner: optax.OptState


def masked_optimizer(tx: optax.GradientTransformation, masks: Mapping[str, jax.Array]
                     ) -> optax.GradientTransformation:
  """tx whose updates are zero where masks[path] is False; the masks live (and are checkpointed) in its state.

  Pair with `keep_masks(masks)` so the parameters themselves are zeroed after every update (updates alone
  would not undo a dense starting point).
  """

  def init(params):
    return MaskState(masks=mask_tree(params, masks, caller='masked_optimizer'), inner=tx.init(params))

  def update(updates, state, params=None):
    updates, inner = tx.update(updates, state.inner, params)
    return _apply(updates, state.masks), MaskState(state.masks, inner)

  return optax.GradientTransformation(init, update)


def keep_masks(masks: Mapping[str, jax.Array]) -> transforms.Transform:
  """A Transform zeroing parameters where masks[path] is False after each update; its state is the masks
  (a tree like the params, None where unmasked), sharded like the parameters they mask."""

  def init(params):
    return mask_tree(params, masks, caller='keep_masks')

  def update(params, state, step, rng):
    del step, rng
    return _apply(params, state), state

  return transforms.Transform(init=init, update=update)
