"""What a method may use besides the model and its params: calibration batches and how their rows split over
devices and processes, training batches, the uncompressed model as teacher, the seed and a directory."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
  """The `calib` argument of every method."""
  calib: tuple = ()  # calibration batches: {'tokens' [B, T] int32, optional 'attention_mask' [B, T]}
  mesh: Any = None  # jax Mesh splitting calibration batch rows over 'data' (None: one device)
  train: Any = None  # fine-tuning batches (`.batch(step)` -> {'inputs', 'targets' | 'attention_mask'}); None: none
  reference_model: Any = None  # the uncompressed model (teacher of distillation and recovery)
  reference: Any = None  # the uncompressed params
  seed: int = 0  # every random choice of every method derives from it (`key`)
  run_dir: str = ''  # where training methods keep their run directories

  def batches(self, *, split: bool = False) -> list:
    """The calibration batches. split: this process's share of each batch's rows, for drivers that take
    `mesh=` (the calibration driver all-reduces their statistics); without it every row."""
    if not self.calib:
      raise ValueError('this method needs calibration batches (calib=[{"tokens": [B, T] int32}, ...], or '
                       '--calib_data); none were given.')
    if not split or self.mesh is None or jax.process_count() == 1:
      return list(self.calib)
    n, i = jax.process_count(), jax.process_index()

    def mine(b):
      rows = len(next(iter(b.values())))
      if rows % n:
        raise ValueError(f'calibration batches of {rows} rows do not split over {n} processes; use a multiple.')
      return {k: v[i * rows // n:(i + 1) * rows // n] for k, v in b.items()}
    return [mine(b) for b in self.calib]

  def driver_kwargs(self) -> dict:
    """Keyword arguments of `calibration.run_sequential` / `calibrate` for this context's mesh."""
    return {} if self.mesh is None else {'mesh': self.mesh}

  def key(self, name: str) -> jax.Array:
    """A method's key: the seed folded with the method's name (the same recipe and seed, the same key)."""
    return jax.random.fold_in(jax.random.key(self.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)

  def needs_train(self, name: str) -> Any:
    """The training batches, or a ValueError naming the method that needs them."""
    if self.train is None:
      raise ValueError(f'{name} trains, and this run has no training batches (Context(train=...)).')
    return self.train

  def teacher(self, name: str) -> tuple[Any, Any]:
    """(reference_model, reference params), or a ValueError naming the method that distils from them."""
    if self.reference_model is None or self.reference is None:
      raise ValueError(f'{name} distils from the uncompressed model; give Context(reference_model=..., '
                       'reference=...).')
    return self.reference_model, self.reference


def as_context(calib: Context | Sequence | None) -> Context:
  """A method's `calib`: a Context as it is, a sequence of calibration batches (or None: none) wrapped in one."""
  if isinstance(calib, Context):
    return calib
  if calib is None:
    return Context()
  if isinstance(calib, (str, bytes)) or not isinstance(calib, Sequence):
    raise TypeError(f'calib must be a registry.Context or a list of calibration batches; got {type(calib).__name__}.')
  return Context(calib=tuple(calib))


def local(tree):
  """Arrays replicated over a multi-process mesh -> this process's copy (later methods run on one device)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f'a method returned an array of shape {x.shape} split over processes; expected replicated.')
      return jnp.asarray(x.addressable_data(0))
    return x
  return jax.tree.map(one, tree)
