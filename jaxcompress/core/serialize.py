"""Compact safetensors files for compressed parameter trees (the "disk" column of `core.stats`).

Each weight becomes one or more named tensors; a JSON description of the tree and of every leaf's format goes
in the safetensors header metadata. On disk, quantized codes are packed to exactly `bits` bits each, masked
weights keep only their kept values plus a one-bit-per-entry map, and shared storage is written once. No
pickle: loading reads tensors and JSON only.

    save('model.jc.safetensors', params)
    params = load('model.jc.safetensors')

Integrity: the header records a sha256 of every tensor (its dtype, shape and bytes) and of the tree description,
and `load` checks each tensor as it reads it, so a flipped byte is an error naming the file and the tensor instead
of a model that loads with other weights; a truncated file or a damaged header is a ValueError naming the file.
Files written before the checksums existed (no 'tensor_sha256' in the header) load unchecked.

Each leaf kind writes and reads its own tensors through `register(kind, cls, encode, decode)`: the kinds of
`core` register themselves next to their classes (masked.py, quantized.py, lowrank.py, shared.py), and a
family adds a kind the same way without editing this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxcompress.core import leaf as leaf_lib

FORMAT = 'jaxcompress/1'
CHECKSUMS = 'tensor_sha256'  # header metadata: JSON {tensor name: sha256 hex of dtype, shape and bytes}
TREE_CHECKSUM = 'tree_sha256'  # header metadata: sha256 hex of the 'tree' and 'user' texts
REMEDY = 'recreate it with the run that wrote it, or restore a copy'


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2**bits -> uint8 bytes holding exactly ceil(n * bits / 8) bytes, little-endian bits."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder='little')


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
  planes = np.unpackbits(data, count=n * bits, bitorder='little').reshape(n, bits)
  return (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


def host(x) -> np.ndarray:
  """A (possibly device-resident) array as a host numpy array."""
  return np.asarray(jax.device_get(x))


@dataclasses.dataclass(frozen=True)
class Writer:
  """What a leaf kind's encoder writes through: tensors named `name + suffix`, and nested weights."""

  name: str  # the weight's path, e.g. 'layers/0/mlp/up_proj/kernel'
  tensors: dict[str, np.ndarray]  # every tensor of the file being written, by name

  def put(self, suffix: str, array: Any) -> None:
    """Stores `array` (host-side copy) as the tensor `name + suffix`, e.g. suffix '.codes'."""
    self.tensors[self.name + suffix] = host(array)

  def weight(self, suffix: str, w: Any) -> dict:
    """Encodes a nested weight (dense or any registered kind) under `name + suffix`; returns its description."""
    return _encode(self.name + suffix, w, self.tensors)


@dataclasses.dataclass(frozen=True)
class Reader:
  """What a leaf kind's decoder reads through: the tensors and nested weights its encoder wrote."""

  name: str  # the weight's path
  file: Any  # the open safetensors file

  def get(self, suffix: str) -> np.ndarray:
    """The tensor `name + suffix`, checked against its recorded checksum."""
    return self.file.get_tensor(self.name + suffix)

  def weight(self, suffix: str, desc: dict) -> Any:
    return _decode(self.name + suffix, desc, self.file)


Encoder = Callable[[Any, Writer], dict]  # (leaf, writer) -> JSON-able description of its format
Decoder = Callable[[dict, Reader], Any]  # (description, reader) -> the leaf


@dataclasses.dataclass(frozen=True)
class Codec:
  cls: type  # the leaf class this kind stores (matched exactly, not by subclass)
  encode: Encoder
  decode: Decoder


_KINDS: dict[str, Codec] = {}
_KIND_OF: dict[type, str] = {}
_RESERVED = ('dense', 'kept')


def register(kind: str, cls: type, encode: Encoder, decode: Decoder) -> None:
  """Gives leaf class `cls` an on-disk format under the name `kind`.

  encode(leaf, writer) stores the leaf's tensors with `writer.put(suffix, array)` (nested weights with
  `writer.weight(suffix, w)`) and returns a JSON-able description of its format; decode(desc, reader) rebuilds
  the leaf from `reader.get(suffix)` / `reader.weight(suffix, desc[...])`. The description is stored as
  {'kind': kind, **desc}. A leaf's `disk_bytes()` must equal the bytes its encoder writes. Registering the same
  kind again for the same class replaces it (module reloads); another class under a taken name is an error.
  """
  if not isinstance(kind, str) or not kind or kind in _RESERVED:
    raise ValueError(f'serialize.register: kind={kind!r} must be a non-empty name other than {_RESERVED}.')
  if not (isinstance(cls, type) and issubclass(cls, leaf_lib.Compressed)):
    raise TypeError(f'serialize.register: cls={cls!r} must be a subclass of core.Compressed.')
  old = _KINDS.get(kind)
  if old is not None and old.cls.__qualname__ != cls.__qualname__:
    raise ValueError(f"serialize.register: kind {kind!r} is already registered for {old.cls.__qualname__}; "
                     f'choose another name for {cls.__qualname__}.')
  if old is not None:
    _KIND_OF.pop(old.cls, None)
  _KINDS[kind] = Codec(cls=cls, encode=encode, decode=decode)
  _KIND_OF[cls] = kind


def kinds() -> dict[str, type]:
  """{kind name: leaf class} of every registered on-disk format."""
  return {k: c.cls for k, c in _KINDS.items()}


def _encode(name: str, w: Any, tensors: dict[str, np.ndarray]) -> dict:
  """Adds w's tensors under `name`; returns its JSON description."""
  if not leaf_lib.is_compressed(w):
    tensors[name] = host(w)
    return {'kind': 'dense'}
  kind = _KIND_OF.get(type(w))
  if kind is None:
    raise TypeError(f"save: no on-disk format for {type(w).__name__} at '{name}'; register one with "
                    'jaxcompress.core.serialize.register(kind, cls, encode, decode).')
  return {'kind': kind, **_KINDS[kind].encode(w, Writer(name, tensors))}


def _decode(name: str, desc: dict, f) -> Any:
  kind = desc['kind']
  if kind == 'dense':
    return jnp.asarray(f.get_tensor(name))
  if kind not in _KINDS:
    raise ValueError(f"load: unknown leaf kind {kind!r} at '{name}'; the file may come from a newer version, "
                     'or the module that registers this kind has not been imported.')
  return _KINDS[kind].decode(desc, Reader(name, f))


def _encode_tree(params: Any, metadata: dict[str, Any] | None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, header metadata) that store params, with the checksums `load` verifies."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=leaf_lib.is_weight_leaf)[0]
  tensors: dict[str, np.ndarray] = {}
  entries = []
  for keypath, w in leaves:
    keys = [_key(k) for k in keypath]
    name = '/'.join(str(k) for _, k in keys)
    entries.append({'keys': keys, 'leaf': _encode(name, w, tensors)})
  tree, user = json.dumps(entries), json.dumps(metadata or {})
  sums = json.dumps({k: tensor_digest(t) for k, t in sorted(tensors.items())})
  return tensors, {'format': FORMAT, 'tree': tree, 'user': user, CHECKSUMS: sums,
                   TREE_CHECKSUM: _text_digest(tree, user)}


def tensor_digest(a: np.ndarray) -> str:
  """sha256 hex of a tensor's dtype, shape and bytes (a header edit to either is caught as well as its data)."""
  a = np.ascontiguousarray(a)
  h = hashlib.sha256(f'{a.dtype.name}{list(a.shape)}'.encode())
  h.update(a.reshape(-1).view(np.uint8))
  return h.hexdigest()


def _text_digest(tree: str, user: str) -> str:
  return hashlib.sha256(json.dumps([tree, user]).encode()).hexdigest()


def save(path: str | os.PathLike, params: Any, metadata: dict[str, Any] | None = None) -> int:
  """Writes params; returns the bytes of tensor data written (equals `stats.totals(params).disk`)."""
  tensors, header = _encode_tree(params, metadata)
  tmp = f'{os.fspath(path)}.tmp'
  save_file(tensors, tmp, metadata=header)
  _sort_header(tmp)
  os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
  return sum(t.nbytes for t in tensors.values())


def dumps(params: Any) -> bytes:
  """params as safetensors bytes in `save`'s format, in memory (compressed weights sent between processes)."""
  tensors, header = _encode_tree(params, None)
  return safetensors.numpy.save(tensors, metadata=header)


def loads(data: bytes) -> Any:
  """The parameter tree `dumps` encoded (read through a temporary file: safetensors' in-memory reader has no
  bfloat16 or fp8)."""
  with tempfile.TemporaryDirectory(prefix='jaxcompress-') as d:
    path = os.path.join(d, 'tree.safetensors')
    with open(path, 'wb') as f:
      f.write(data)
    return jax.tree.map(np.asarray, load(path))


def _sort_header(path: str) -> None:
  """Rewrites a safetensors header with its keys sorted, in place, so equal params give equal bytes.

  The safetensors writer keeps `__metadata__` in a hash map whose order changes from call to call; sorting gives
  the same JSON text, hence the same length and offsets, in a fixed order (padded with the spaces the format
  allows when the writer used longer escapes).
  """
  with open(path, 'r+b') as f:
    n = int.from_bytes(f.read(8), 'little')
    raw = f.read(n)
    header = json.loads(raw)
    header['__metadata__'] = dict(sorted(header.get('__metadata__', {}).items()))
    text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
    if len(text) > n:  # never grows the header: keep the writer's (valid) order
      return
    f.seek(8)
    f.write(text + b' ' * (n - len(text)))


def load(path: str | os.PathLike, *, verify: bool = True) -> Any:
  """Reads a file written by `save` back into the same parameter tree.

  verify: check every tensor read, and the tree description, against the checksums in the header (a file
  written before they existed has none and loads unchecked). A mismatch, a truncated file or a damaged header is
  a ValueError naming the file (and the tensor).
  """
  f = _open(path)
  meta = f.metadata() or {}
  if meta.get('format') != FORMAT:
    raise ValueError(f"load: '{path}' has format {meta.get('format')!r}, not {FORMAT!r}; for Hugging Face "
                     'checkpoints use jaxcompress.models.from_pretrained.')
  sums = _checksums(path, meta) if verify else None
  src = _Checked(f, os.fspath(path), sums)
  tree: dict = {}
  kinds: dict[int, str] = {}  # id(container) -> 'dict' | 'list' | 'tuple'
  try:
    for entry in _json(path, meta, 'tree'):
      keys = entry['keys']
      node = tree
      for i, (kind, k) in enumerate(keys):
        kinds[id(node)] = kind
        if i == len(keys) - 1:
          node[k] = _decode('/'.join(str(k) for _, k in keys), entry['leaf'], src)
        else:
          node = node.setdefault(k, {})
  except (KeyError, TypeError, IndexError) as e:
    if sums is not None:  # the tree description was checked: not a damaged header
      raise
    raise ValueError(f"load: '{path}' has a damaged header (its tree description lacks {e}); {REMEDY}.") from None
  return _containers(tree, kinds)


def user_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The `metadata` dict given to `save` (a ValueError naming the file if it cannot be read)."""
  return _json(path, _open(path).metadata() or {}, 'user', '{}')


def _open(path: str | os.PathLike):
  try:
    return safe_open(os.fspath(path), framework='numpy')
  except (SafetensorError, OSError) as e:
    raise ValueError(f"load: '{path}' is not a readable safetensors file ({e}); it may be truncated or its header "
                     f'damaged: {REMEDY}.') from None


def _json(path, meta: dict[str, str], key: str, default: str | None = None) -> Any:
  try:
    return json.loads(meta[key] if default is None else meta.get(key, default))
  except KeyError:
    raise ValueError(f"load: '{path}' has a damaged header (no '{key}' entry); {REMEDY}.") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"load: '{path}' has a damaged header ('{key}' is not valid JSON: {e}); {REMEDY}.") from None


def _checksums(path, meta: dict[str, str]) -> dict[str, str] | None:
  """{tensor name: sha256} of a file that records them (None for one written before checksums existed), once
  the tree description is checked against its own."""
  if CHECKSUMS not in meta:
    return None
  sums = _json(path, meta, CHECKSUMS)
  if meta.get(TREE_CHECKSUM) != _text_digest(meta.get('tree', ''), meta.get('user', '')):
    raise ValueError(f"load: '{path}': the tree description in its header does not match its recorded sha256 (the "
                     f'header was changed after saving); {REMEDY}.')
  return sums


@dataclasses.dataclass(frozen=True)
class _Checked:
  """An open safetensors file whose `get_tensor` checks each tensor against its recorded checksum."""

  file: Any
  path: str
  sums: dict[str, str] | None  # None: nothing to check against

  def get_tensor(self, name: str) -> np.ndarray:
    try:
      t = self.file.get_tensor(name)
    except SafetensorError as e:
      raise ValueError(f"load: '{self.path}': tensor '{name}', which its tree names, cannot be read ({e}); the "
                       f'file is damaged: {REMEDY}.') from None
    if self.sums is not None and self.sums.get(name) != tensor_digest(t):
      why = 'has no recorded sha256' if name not in self.sums else 'does not match its recorded sha256'
      raise ValueError(f"load: '{self.path}': tensor '{name}' {why}; the file was changed or damaged after "
                       f'saving: {REMEDY}.')
    return t


def _key(k) -> tuple[str, str | int]:
  """A key path entry -> (kind of the container it indexes, key)."""
  if isinstance(k, jax.tree_util.SequenceKey):
    return ('list', k.idx)
  if isinstance(k, jax.tree_util.DictKey):
    return ('dict', k.key)
  raise TypeError(f'save: only dicts and lists of weights are supported, found key {k!r}.')


def _containers(node: Any, kinds: dict[int, str]) -> Any:
  """Dicts built while loading -> the dicts and lists they were saved from."""
  if not isinstance(node, dict):
    return node
  kind = kinds.get(id(node), 'dict')
  children = {k: _containers(v, kinds) for k, v in node.items()}
  return [children[i] for i in range(len(children))] if kind == 'list' else children
