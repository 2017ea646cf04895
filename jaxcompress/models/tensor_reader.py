"""Reads tensors, or slices of them, from a safetensors file with positioned reads (`os.pread`).

No memory map: a mapped file's pages count in the process's resident memory for as long as the mapping lives,
so loading through `safe_open(...).get_tensor` holds the whole file resident beside the parameters. Here each
read lands in one fresh NumPy buffer that the caller frees after placing it, and a slice reads only its own
bytes (one read per contiguous run), so a process loading its shards of a model reads only those.

Format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length n, n bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data, row-major.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from jaxcompress.core import serialize

DTYPES = serialize.DTYPES  # safetensors' dtype codes -> NumPy dtypes


ALIGN = 64  # bytes: jax.device_put on CPU adopts a NumPy buffer this aligned instead of copying it


def _aligned_empty(shape: list[int], dtype: np.dtype) -> np.ndarray:
  """np.empty(shape, dtype) starting on an ALIGN-byte boundary, so placing it on a CPU device copies nothing."""
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = -raw.ctypes.data % ALIGN
  return raw[start:start + nbytes].view(dtype).reshape(shape)


class TensorFile:
  """One open safetensors file: `shape(name)`, `dtype(name)`, `read(name, index)`."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    self._fd = os.open(self.path, os.O_RDONLY)
    try:
      head = os.pread(self._fd, 8, 0)
      if len(head) < 8:
        raise ValueError('shorter than the 8-byte header length')
      n = int.from_bytes(head, 'little')
      header = json.loads(os.pread(self._fd, n, 8))
    except (ValueError, OSError) as e:
      os.close(self._fd)
      raise ValueError(f"cannot read the safetensors header of '{self.path}' ({e}); the file is truncated or "
                       'corrupt.') from None
    header.pop('__metadata__', None)
    self._start = 8 + n
    self._entries = header

  def close(self) -> None:
    os.close(self._fd)

  def names(self) -> frozenset[str]:
    return frozenset(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]['shape'])

  def dtype(self, name: str) -> np.dtype:
    code = self._entries[name]['dtype']
    if code not in DTYPES:
      raise ValueError(f"tensor '{name}' in '{self.path}' has dtype {code}; supported: {sorted(DTYPES)}.")
    return np.dtype(DTYPES[code])

  def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The tensor, or tensor[index] for an index of unit-step slices (one per leading dimension; missing
    trailing ones are full). Reads only the bytes of the slice: one pread per contiguous run."""
    shape, dtype = self.shape(name), self.dtype(name)
    begin, end = self._entries[name]['data_offsets']
    if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f"tensor '{name}' in '{self.path}' spans {end - begin} bytes, not the {list(shape)} "
                       f'{dtype} its header says; the file is corrupt.')
    ranges = [range(*s.indices(d)) if s.step in (None, 1) else None
              for s, d in zip(tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ())), shape)]
    if any(r is None for r in ranges):
      raise ValueError(f'TensorFile.read: index {index} has a slice with a step; only unit steps are read.')
    out = _aligned_empty([len(r) for r in ranges], dtype)
    if out.size == 0:
      return out
    # The trailing dimensions read whole form one contiguous run; the others are walked run by run.
    k = len(shape)
    while k > 0 and len(ranges[k - 1]) == shape[k - 1]:
      k -= 1
    if k == 0:
      self._pread_into(out, self._start + begin, name)
      return out
    run_dims = ranges[k - 1:]  # dimension k-1 is partly read: each run covers its slice and everything after
    inner = int(np.prod(shape[k:], dtype=np.int64))
    strides = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
    flat = out.reshape(-1, len(run_dims[0]) * inner)
    for row, lead in enumerate(np.ndindex(*[len(r) for r in ranges[:k - 1]])):
      offset = sum(ranges[i][j] * strides[i] for i, j in enumerate(lead)) + ranges[k - 1].start * strides[k - 1]
      self._pread_into(flat[row], self._start + begin + offset * dtype.itemsize, name)
    return out

  def _pread_into(self, buffer: np.ndarray, offset: int, name: str) -> None:
    view = memoryview(buffer.reshape(-1).view(np.uint8))
    done = 0
    while done < len(view):
      chunk = os.preadv(self._fd, [view[done:]], offset + done)
      if chunk <= 0:
        raise ValueError(f"reading tensor '{name}' from '{self.path}' failed (the file ends at byte "
                         f'{offset + done}); the file is truncated or corrupt.')
      done += chunk
