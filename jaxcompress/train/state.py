"""Training state as one pytree, and splitting parameters into trained and held-fixed parts."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxcompress import core
from jaxcompress.train import transforms as transforms_lib

# Decides, per array inside the parameter tree, whether the optimizer updates it.
# Called as trainable(path, array) with paths like "layers/0/mlp/up_proj/kernel/value" (inside a Masked leaf).
Trainable = Callable[[str, Any], bool]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """Everything a step reads and writes.

  step:      int32 scalar, optimizer steps taken.
  params:    the model's parameters in float32 (master weights), compressed leaves included.
  opt_state: optax state over the trainable part of params (None where an array is held fixed).
  rng:       uint32 key data of the run's training stream; step keys are fold_in(rng, step).
  transform_state: the state of the run's `transforms.Transform` (schedules, masks, step sizes; () if none).
  frozen:    pytrees read but never trained nor checkpointed (a distillation teacher's params).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  transform_state: Any = ()
  frozen: Any = None

  def checkpointed(self) -> dict[str, Any]:
    """The part a checkpoint holds: all but `frozen`, which is rebuilt from its source."""
    return {'step': self.step, 'params': self.params, 'opt_state': self.opt_state, 'rng': self.rng,
            'transform_state': self.transform_state}

  def replace(self, **kwargs) -> TrainState:
    return dataclasses.replace(self, **kwargs)


def floating(_: str, x: Any) -> bool:
  """Default `Trainable`: every floating-point array (masks, integer codes and counters stay fixed)."""
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def matching(pattern: str) -> Trainable:
  """Trainable arrays are floating ones whose path matches the regex (e.g. LoRA factors: r'/(a|b)$')."""
  rx = re.compile(pattern)
  return lambda path, x: floating(path, x) and bool(rx.search(path))


def partition(params: Any, trainable: Trainable) -> tuple[Any, Any]:
  """(trained, fixed): two trees of params' structure, each with None where the other has the array."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keep = [trainable(core.paths.path_str(kp), x) for kp, x in leaves]
  trained = treedef.unflatten([x if k else None for (_, x), k in zip(leaves, keep)])
  fixed = treedef.unflatten([None if k else x for (_, x), k in zip(leaves, keep)])
  return trained, fixed


def combine(trained: Any, fixed: Any) -> Any:
  """Inverse of `partition`."""
  return jax.tree.map(lambda a, b: b if a is None else a, trained, fixed, is_leaf=lambda x: x is None)


def init_state(params: Any, optimizer: optax.GradientTransformation, rng: jax.Array, *,
               trainable: Trainable = floating, frozen: Any = None,
               transforms: transforms_lib.Transform | Sequence[transforms_lib.Transform] = ()) -> TrainState:
  """Step 0: optimizer state over the trainable arrays of params, the transforms' initial state.
  rng: a key or raw key data."""
  trained, _ = partition(params, trainable)
  if not jax.tree.leaves(trained):
    raise ValueError('init_state: no parameter is trainable; check the `trainable` predicate '
                     '(default: every floating-point array).')
  data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trained),
                    rng=jnp.asarray(data, jnp.uint32),
                    transform_state=transforms_lib.as_transform(transforms).init(params), frozen=frozen)


def cast_floating(tree: Any, dtype) -> Any:
  """Floating arrays cast to dtype (bf16 compute over fp32 master weights); the rest untouched."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def param_hash(params: Any) -> str:
  """A hash of every bit of every array (host-side), for reproducibility checks."""
  import hashlib

  import numpy as np
  h = hashlib.sha256()
  from jax.experimental import multihost_utils
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    h.update(core.paths.path_str(path).encode())
    h.update(np.ascontiguousarray(jax.device_get(x)).tobytes())
  return h.hexdigest()
