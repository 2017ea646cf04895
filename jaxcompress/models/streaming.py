"""A Hugging Face checkpoint read a part at a time: one block's parameters, or everything outside the blocks.

    ckpt = CheckpointStream('path/to/dir')
    block = ckpt.read(lambda p: p.startswith('layers/3/'))      # {'layers': {3: {...}}} host numpy arrays
    ckpt.close()

Where `from_pretrained` builds the whole tree, this reads only the tensors a predicate over our parameter
paths selects (positioned reads through `tensor_reader`, one tensor at a time), so a compressor can hold one
block of a model larger than host memory. `fingerprint()` identifies the checkpoint cheaply (config, shard
sizes and headers, and sampled data bytes), for refusing to resume on another model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.models import hf
from jaxcompress.models.base import Model, Params

SAMPLES = 16  # data chunks hashed per shard file by `fingerprint`
SAMPLE_BYTES = 1 << 16


class CheckpointStream:
  """An open HF checkpoint directory: `model`, `read(predicate)`, `fingerprint()`, `close()`."""

  def __init__(self, path: str | os.PathLike, *, dtype: Any = None):
    """path: checkpoint directory (config.json + safetensors). dtype: cast floating tensors to it on read."""
    self.path = hf.resolve_dir(path)
    self._files = hf._tensor_files(self.path)
    self.model: Model = hf._model_from_config(self.path, frozenset(self._files))
    self._expected = {p: tuple(s.shape) for p, s in core.flatten(self.model.abstract_params()).items()}
    self._table = self.model.hf_table()
    self._prefix = hf._detect_prefix(self.model, self._files, self._table)
    self._dtype = dtype
    self._handles: dict[Path, Any] = {}

  def __enter__(self) -> CheckpointStream:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    for reader, _ in self._handles.values():
      reader.close()
    self._handles.clear()

  def paths(self) -> tuple[str, ...]:
    """Every parameter path of the model, in table order."""
    return tuple(self._expected)

  def read(self, wanted: Callable[[str], bool]) -> Params:
    """The nested tree of the parameters whose path `wanted(path)` accepts, as host numpy arrays (block
    indices as int keys, as `model.init` gives them). Each HF tensor is read once and converted by the table."""
    flat: dict[str, np.ndarray] = {}
    for row in self._table:
      if not any(wanted(o) for o in row.ours):
        continue
      name = self._prefix + row.hf if self._prefix + row.hf in self._files else row.hf
      if name not in self._files:
        raise KeyError(f"checkpoint '{self.path}' lacks tensor '{name}' (for {', '.join(row.ours)}).")
      reader = hf._reader(self.path, self._files, self._handles, name)
      want = tuple(row.hf_shape(*(self._expected[o] for o in row.ours)))
      if reader.shape(name) != want:
        raise ValueError(f"tensor '{name}' in '{self._files[name].name}' has shape {list(reader.shape(name))}; "
                         f'config.json implies {list(want)}.')
      for our_path, arr in zip(row.ours, row.to_ours(hf._read(reader, name))):
        if wanted(our_path):
          if self._dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
            arr = arr.astype(self._dtype)
          flat[our_path] = arr
    return _nest(flat)

  def fingerprint(self) -> dict[str, Any]:
    """{'config': sha256 of config.json, 'files': {name: {'bytes', 'sha256' of header + sampled data}}}.

    Sampled, not a full hash: SAMPLES chunks of SAMPLE_BYTES at even offsets of each shard, so identifying a
    70B checkpoint reads 16 MiB, not 140 GB. Any re-export, different model or truncation changes it.
    """
    out = {'config': hashlib.sha256((self.path / 'config.json').read_bytes()).hexdigest(), 'files': {}}
    for f in sorted(set(self._files.values())):
      size = f.stat().st_size
      h = hashlib.sha256()
      with open(f, 'rb') as fh:
        head = int.from_bytes(fh.read(8), 'little')
        h.update(fh.read(head))
        for k in range(SAMPLES):
          fh.seek(int(size * k / SAMPLES))
          h.update(fh.read(SAMPLE_BYTES))
      out['files'][f.name] = {'bytes': size, 'sha256': h.hexdigest()}
    return out


def _nest(flat: dict[str, Any]) -> Params:
  tree: dict = {}
  for path, x in flat.items():
    keys = [int(k) if k.isdigit() else k for k in path.split('/')]
    node = tree
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = x
  return tree
