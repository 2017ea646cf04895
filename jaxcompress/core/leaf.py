"""The base of every compressed weight, and the generic functions that treat arrays and leaves alike.

A compressed weight is a frozen dataclass registered as a pytree node: its arrays are pytree children (so it
jits, shards and checkpoints like any array) and its format is static metadata. Every kind answers:

  shape, dtype        of the dense array it stands for
  materialize()       that dense array
  matmul(x)           x @ W, without necessarily forming W   (x: [..., in], W: [in, out])
  stored_params()     how many scalars it really stores (host-side: may read the values)
  memory_bytes()      bytes its arrays occupy now
  disk_bytes()        bytes `core.serialize.save` writes for it
  matmul_flops()      floating-point operations of `matmul` for one row of x

Fields that hold arrays may hold another compressed weight instead, so kinds compose (a `LowRank` whose
factors are `Quantized`). The functions below (`materialize`, `shape_of`, ...) accept either.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

Array: TypeAlias = jax.Array | np.ndarray
# A weight as models see it: a plain array or a compressed leaf.
Weight: TypeAlias = Any


class Compressed(abc.ABC):
  """Abstract base of the typed leaves (`Masked`, `Quantized`, `LowRank`, `Shared`)."""

  @property
  @abc.abstractmethod
  def shape(self) -> tuple[int, ...]:
    """Shape of the dense array this leaf stands for."""

  @property
  @abc.abstractmethod
  def dtype(self) -> np.dtype:
    """Dtype `materialize()` returns."""

  @abc.abstractmethod
  def materialize(self) -> jax.Array:
    """The dense array this leaf stands for."""

  def matmul(self, x: jax.Array) -> jax.Array:
    """x: [..., in] @ self: [in, out] -> [..., out]. Kinds override this where they save work."""
    return jnp.matmul(x, self.materialize().astype(x.dtype))

  @abc.abstractmethod
  def stored_params(self) -> int:
    """Scalars actually stored (a masked weight stores its non-zeros)."""

  @abc.abstractmethod
  def memory_bytes(self) -> int:
    """Bytes of the arrays held now."""

  @abc.abstractmethod
  def disk_bytes(self) -> int:
    """Bytes of tensor data `core.serialize.save` writes for this leaf (headers excluded)."""

  @abc.abstractmethod
  def matmul_flops(self) -> int:
    """FLOPs of `x @ W` for one row of x, as a kernel that exploits this format would execute them."""

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)


def leaf_type(cls):
  """Registers a frozen dataclass as a pytree node: array fields are children, `static` fields metadata."""
  fields = dataclasses.fields(cls)
  meta = [f.name for f in fields if f.metadata.get('static', False)]
  data = [f.name for f in fields if not f.metadata.get('static', False)]
  return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static(**kwargs):
  """A dataclass field that is pytree metadata (hashed, compared, never traced)."""
  return dataclasses.field(metadata={'static': True}, **kwargs)


def is_compressed(x: Any) -> bool:
  return isinstance(x, Compressed)


def is_weight_leaf(x: Any) -> bool:
  """`is_leaf` predicate for tree functions that should see compressed weights whole."""
  return isinstance(x, Compressed)


def materialize(w: Weight) -> jax.Array:
  """Dense array of a plain or compressed weight."""
  return w.materialize() if isinstance(w, Compressed) else jnp.asarray(w)


def materialize_tree(tree: Any) -> Any:
  """Every compressed leaf in `tree` replaced by its dense array."""
  return jax.tree.map(materialize, tree, is_leaf=is_weight_leaf)


def shape_of(w: Weight) -> tuple[int, ...]:
  return tuple(w.shape)


def dtype_of(w: Weight) -> np.dtype:
  return np.dtype(w.dtype)


def stored_params(w: Weight) -> int:
  return w.stored_params() if isinstance(w, Compressed) else int(np.size(w))


def memory_bytes(w: Weight) -> int:
  if isinstance(w, Compressed):
    return w.memory_bytes()
  return int(np.size(w)) * np.dtype(w.dtype).itemsize


def disk_bytes(w: Weight) -> int:
  return w.disk_bytes() if isinstance(w, Compressed) else memory_bytes(w)


def matmul_flops(w: Weight) -> int:
  """FLOPs of one row times `w` ([in, out]): 2·in·out for a dense weight."""
  if isinstance(w, Compressed):
    return w.matmul_flops()
  if np.ndim(w) != 2:
    raise ValueError(f'matmul_flops needs a 2-D weight [in, out], got shape {tuple(np.shape(w))}.')
  return 2 * int(np.size(w))


def nonzeros(w: Weight) -> int:
  """Non-zero entries of the dense array (host-side; works on arrays sharded across processes)."""
  return count_nonzero(_dense(w) if isinstance(w, Compressed) else w)


@jax.jit
def _dense(w: Compressed) -> jax.Array:
  """w.materialize() as one compiled program per leaf kind and shapes (eagerly, each of its operations would
  compile on its own)."""
  return w.materialize()


def count_nonzero(x: Array) -> int:
  """Non-zero entries of an array, host-side.

  An array that is not fully addressable (sharded across processes) is counted shard by shard, each distinct
  shard once (replica 0), and the per-process counts are summed across processes; every process must call
  this (it is a collective) and gets the same total.
  """
  if not (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return int(np.count_nonzero(np.asarray(x)))
  from jax.experimental import multihost_utils  # only multi-process programs need it
  local = sum(int(np.count_nonzero(np.asarray(s.data))) for s in x.addressable_shards if s.replica_id == 0)
  # Split into 30-bit halves: without jax_enable_x64 the gathered values are int32.
  parts = np.array([local >> 30, local & ((1 << 30) - 1)], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(parts)).reshape(-1, 2).astype(np.int64)
  return int((gathered[:, 0] << 30).sum() + gathered[:, 1].sum())

