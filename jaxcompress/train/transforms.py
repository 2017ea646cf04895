"""Training transforms: how a method acts inside the training step, with state (optax-style).

A `Transform` is a NamedTuple of three pure functions:

  init(params) -> state                        once, on the float32 master params of a fresh run
  update(params, state, step, rng) -> (params, state)
                                               inside the jitted step, after each applied optimizer update:
                                               re-apply or recompute masks, advance a schedule, ...
  forward(params, state) -> params             inside the loss, on the compute-dtype params (differentiated):
                                               fake quantization with a straight-through estimator, ...

`step` is an int32 scalar, the optimizer updates taken including the one just applied (1 after the first);
`rng` is a key of the transform's own stream (`transform_key`), distinct from the objective's, so adding a
transform never changes what the objective draws. The state is a pytree held in `TrainState.transform_state`:
checkpointed, sharded by the parameter-path rules (an array whose path ends with a parameter's path takes
that parameter's sharding) and restored bit for bit on resume. Defaults are identities with empty state;
`chain(a, b)` runs a then b (its state is the tuple of theirs).

What needs no transform: `Masked` leaves keep their zeros through updates (the gradient of a masked entry is
zero), `Shared` storage receives the sum of its uses' gradients, and adapters train alone under a `trainable`
predicate.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

# A constant folded into the step key: the transform's stream never coincides with the objective's.
_STREAM = zlib.crc32(b'transform') & 0x7FFFFFFF


def _no_state(params: Any) -> Any:
  del params
  return ()


def _keep(params: Any, state: Any, step: jax.Array, rng: jax.Array) -> tuple[Any, Any]:
  del step, rng
  return params, state


def _identity(params: Any, state: Any) -> Any:
  del state
  return params


class Transform(NamedTuple):
  """Pure functions the training step calls; see the module docstring. Each defaults to the identity."""

  init: Callable[[Any], Any] = _no_state
  update: Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any]] = _keep
  forward: Callable[[Any, Any], Any] = _identity


def identity() -> Transform:
  """The transform that changes nothing and holds no state."""
  return Transform()


def chain(*transforms: Transform) -> Transform:
  """Transforms applied left to right in `forward` and in `update`; the state is the tuple of their states.

  Each member gets its own rng (fold_in(rng, index)), so adding one never changes another's draws.
  """
  for i, t in enumerate(transforms):
    if not isinstance(t, Transform):
      raise TypeError(f'chain: argument {i} is a {type(t).__name__}, not a Transform; build one with '
                      'Transform(init=..., update=..., forward=...).')

  def init(params):
    return tuple(t.init(params) for t in transforms)

  def update(params, state, step, rng):
    new_state = []
    for i, (t, s) in enumerate(zip(transforms, state)):
      params, s = t.update(params, s, step, jax.random.fold_in(rng, i))
      new_state.append(s)
    return params, tuple(new_state)

  def forward(params, state):
    for t, s in zip(transforms, state):
      params = t.forward(params, s)
    return params

  return Transform(init, update, forward)


def as_transform(transforms: Transform | Sequence[Transform]) -> Transform:
  """One Transform as is; a sequence of them chained (an empty one is the identity)."""
  if isinstance(transforms, Transform):
    return transforms
  if callable(transforms) or not isinstance(transforms, Sequence):
    raise TypeError(f'transforms={transforms!r}: pass a Transform or a sequence of them (train.transforms).')
  return chain(*transforms)


def transform_key(step_key: jax.Array) -> jax.Array:
  """The transform's key for a step, from the step's key (fold_in(train rng, step))."""
  return jax.random.fold_in(step_key, _STREAM)
