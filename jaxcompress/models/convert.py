"""Conversion tables between Hugging Face tensor names and jaxcompress parameter paths.

A family's table is a list of `TensorMap` rows: one HF tensor, the parameter path(s) it becomes, and a pair of
hooks that convert the array each way (transpose a torch Linear weight, split GPT-2's fused qkv). `{i}` in a
row stands for the layer index; `expand` writes one row per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

ToOurs = Callable[[np.ndarray], tuple[np.ndarray, ...]]
ToHF = Callable[..., np.ndarray]
HFShape = Callable[..., tuple[int, ...]]


def _same_in(x):
  return (x,)


def _same_out(x):
  return x


def _t_in(x):
  return (np.ascontiguousarray(x.T),)


def _t_out(x):
  return np.ascontiguousarray(x.T)


def _same_index(index):
  return tuple(index)


def _t_index(index):
  return tuple(reversed(index))


def _same_shape(s):
  return tuple(s)


def _t_shape(s):
  return tuple(reversed(s))


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """One HF tensor <-> one or more of our parameters."""

  hf: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
  ours: tuple[str, ...]  # e.g. ("layers/{i}/attn/q_proj/kernel",)
  to_ours: ToOurs = _same_in  # HF array -> our arrays
  to_hf: ToHF = _same_out  # our arrays -> HF array
  hf_shape: HFShape = _same_shape  # our shapes -> the HF tensor's shape (checked before converting)
  # A slice of our (single) array, one slice per dimension -> the slice of the HF tensor holding it; None
  # when a slice of ours is not one slice of the HF tensor (a split), so loading reads the whole tensor.
  hf_index: Callable[[tuple[slice, ...]], tuple[slice, ...]] | None = _same_index
  linear: bool = False  # the HF tensor is a torch.nn.Linear weight [out, in] (quantized export formats target these)

  def format(self, i: int) -> TensorMap:
    return dataclasses.replace(self, hf=self.hf.format(i=i), ours=tuple(o.format(i=i) for o in self.ours))


def same(hf: str, ours: str) -> TensorMap:
  return TensorMap(hf, (ours,))


def linear_weight(hf: str, ours: str) -> TensorMap:
  """torch.nn.Linear stores [out, in]; our kernels are [in, out]."""
  return TensorMap(hf, (ours,), _t_in, _t_out, _t_shape, _t_index, linear=True)


def split(hf: str, ours: Sequence[str], axis: int) -> TensorMap:
  """One fused HF tensor cut into equal parts along `axis` (GPT-2's c_attn -> q, k, v)."""
  n = len(ours)

  def fused_shape(*shapes):
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return tuple(out)

  return TensorMap(hf, tuple(ours), lambda x: tuple(np.split(x, n, axis=axis)),
                   lambda *xs: np.concatenate(xs, axis=axis), fused_shape, None)


def expand(rows: Sequence[TensorMap], num_layers: int) -> list[TensorMap]:
  """Rows with '{i}' repeated for every layer; others kept once."""
  out = []
  for row in rows:
    if '{i}' in row.hf:
      out += [row.format(i) for i in range(num_layers)]
    else:
      out.append(row)
  return out
