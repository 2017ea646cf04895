"""Compression-aware training without touching the loop.

A `Hooks` value holds two pure functions the step calls:
  forward(params) -> params                 on the compute-dtype params inside the loss (differentiable):
                                            fake quantization with a straight-through estimator, ...
  after_update(params, opt_state) -> params after the optimizer step: re-apply masks kept in optimizer state.

What needs no hook: `Masked` leaves keep their zeros through updates (the gradient of a masked entry is zero),
`Shared` storage receives the sum of its uses' gradients (models resolve references inside apply), and `LoRA`
leaves train only their factors when the step's `trainable` predicate is `LORA_TRAINABLE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcompress import core
from jaxcompress.train import state as state_lib


def _identity(params):
  return params


def _keep(params, opt_state):
  del opt_state
  return params


class Hooks(NamedTuple):
  forward: Callable[[Any], Any] = _identity
  after_update: Callable[[Any, Any], Any] = _keep


def chain(*hooks: Hooks) -> Hooks:
  """Hooks applied left to right."""

  def forward(params):
    for h in hooks:
      params = h.forward(params)
    return params

  def after_update(params, opt_state):
    for h in hooks:
      params = h.after_update(params, opt_state)
    return params

  return Hooks(forward, after_update)


def straight_through(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """w -> fn(w) in the forward pass, identity in the backward pass (Bengio et al., 2013)."""
  return lambda w: w + jax.lax.stop_gradient(fn(w) - w)


def fake_quant(rules: core.Rules = core.Rules(), *, bits: int = 4, group_size: int | None = 128,
               symmetric: bool = False, fmt: str = 'int') -> Hooks:
  """Quantization-aware training: selected kernels are round-to-nearest quantized in the forward pass."""
  q = straight_through(lambda w: core.fake_quantize(w, bits=bits, group_size=group_size, symmetric=symmetric,
                                                    fmt=fmt, pack=False))

  def on_weight(w):
    if isinstance(w, core.Masked):
      return core.Masked(on_weight(w.value), w.mask)
    if core.is_compressed(w):
      raise TypeError(f'fake_quant: cannot fake-quantize a {type(w).__name__} weight; select dense or Masked ones.')
    return q(w)

  def forward(params):
    return core.select_by(params, rules).map(lambda _, w: on_weight(w), params)

  return Hooks(forward=forward)


# Masks held in optimizer state (jaxpruner's wrap_optax) ------------------------------------------------------


class MaskState(NamedTuple):
  masks: Any  # tree like the trainable params: bool arrays where masked, None elsewhere
  inner: optax.OptState


def masked_optimizer(tx: optax.GradientTransformation, masks: Mapping[str, jax.Array]
                     ) -> optax.GradientTransformation:
  """tx whose updates are zero where masks[path] is False; the masks live (and are checkpointed) in its state.

  masks: {parameter path: bool array of that parameter's shape}. Pair with `keep_masks()` so the parameters
  themselves are zeroed after every update (updates alone would not undo weight decay).
  """

  def mask_tree(params):
    flat = core.flatten(params)
    unknown = sorted(set(masks) - set(flat))
    if unknown:
      raise KeyError(f'masked_optimizer: no trainable parameter at {unknown[:3]}.')
    return core.map_with_path(lambda p, x: None if p not in masks else jnp.asarray(masks[p], bool), params)

  def init(params):
    return MaskState(masks=mask_tree(params), inner=tx.init(params))

  def update(updates, state, params=None):
    updates, inner = tx.update(updates, state.inner, params)
    updates = jax.tree.map(lambda u, m: u if m is None else jnp.where(m, u, 0), updates, state.masks,
                           is_leaf=lambda x: x is None)
    return updates, MaskState(state.masks, inner)

  return optax.GradientTransformation(init, update)


def keep_masks() -> Hooks:
  """Zeroes parameters where the `masked_optimizer` state's masks are False, after each update."""

  def after_update(params, opt_state):
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskState))
             if isinstance(s, MaskState)]
    if not found:
      raise ValueError('keep_masks: the optimizer state holds no MaskState; wrap the optimizer with '
                       'masked_optimizer.')
    masks = found[0].masks
    flat_masks = {p: m for p, m in core.flatten(masks).items() if m is not None}
    return core.map_with_path(lambda p, x: jnp.where(flat_masks[p], x, 0) if p in flat_masks else x, params)

  return Hooks(after_update=after_update)


# LoRA ---------------------------------------------------------------------------------------------------------

LORA_TRAINABLE = state_lib.matching(r'/lora_(a|b)$')


def add_lora(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
             rules: core.Rules = core.Rules()) -> Any:
  """Selected kernels become `LoRA(base, a, b)` with a ~ N(0, 1/in), b = 0, so the model is unchanged at first."""
  if rank < 1:
    raise ValueError(f'add_lora: rank={rank} must be >= 1.')
  sel = core.select_by(params, rules)
  keys = dict(zip(sel.paths, jax.random.split(key, max(len(sel), 1))))

  def adapt(path, w):
    d_in, d_out = core.shape_of(w)
    a = jax.random.normal(keys[path], (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
    return core.LoRA(base=w, lora_a=a, lora_b=jnp.zeros((rank, d_out), jnp.float32), scale=alpha / rank)

  return sel.map(adapt, params)
