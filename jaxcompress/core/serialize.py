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

A tree too large for memory is written from loaders of its parts (`save_parts`, e.g. the blocks of an out-of-core
compression): each part's tensors go to a scratch file as the part is encoded, and the file is put together once
every name and shape is known. `save` is the one-part case, so both give the same bytes for the same tree.

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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from jaxcompress.core import leaf as leaf_lib

FORMAT = 'jaxcompress/1'
CHECKSUMS = 'tensor_sha256'  # header metadata: JSON {tensor name: sha256 hex of dtype, shape and bytes}
TREE_CHECKSUM = 'tree_sha256'  # header metadata: sha256 hex of the 'tree' and 'user' texts
REMEDY = 'recreate it with the run that wrote it, or restore a copy'
# safetensors' dtype codes (https://huggingface.co/docs/safetensors), what this writer and `models.tensor_reader` use
DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2, 'I64': np.int64, 'I32': np.int32,
          'I16': np.int16, 'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8,
          'BOOL': np.bool_}
_CODE = {np.dtype(t): code for code, t in DTYPES.items()}
_COPY = 64 << 20  # bytes per read when the file is put together from the scratch file
_LE64 = np.dtype('<u8')  # packed codes are little-endian on every host


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2**bits -> uint8 bytes holding exactly ceil(n * bits / 8) bytes, little-endian bits: code i
  holds bits i·bits .. (i+1)·bits − 1 of the stream, and stream bit k is bit k % 8 of byte k // 8.

  Eight codes fill `bits` whole bytes, so each run of eight is assembled in one little-endian uint64 and its low
  `bits` bytes kept (a pass per code of the run, over n / 8 words: several times faster than a pass per bit)."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  n = flat.size
  runs = np.zeros((-(-n // 8), 8), np.uint8)
  runs.reshape(-1)[:n] = flat
  word = np.zeros(len(runs), _LE64)
  for j in range(8):
    word |= runs[:, j].astype(_LE64) << np.uint64(j * bits)
  return np.ascontiguousarray(word.view(np.uint8).reshape(-1, 8)[:, :bits]).reshape(-1)[:-(-n * bits // 8)]


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
  """The n codes `pack_bits` wrote into `data`."""
  runs = -(-n // 8)
  stream = np.zeros(runs * bits, np.uint8)
  given = np.asarray(data, np.uint8).reshape(-1)[:runs * bits]
  stream[:given.size] = given
  raw = np.zeros((runs, 8), np.uint8)
  raw[:, :bits] = stream.reshape(runs, bits)
  word = raw.view(_LE64).reshape(runs)
  codes = np.empty((runs, 8), np.uint8)
  for j in range(8):
    codes[:, j] = (word >> np.uint64(j * bits)) & np.uint64((1 << bits) - 1)
  return codes.reshape(-1)[:n]


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


def _encode_part(params: Any, tensors: dict[str, np.ndarray]) -> list[dict]:
  """The tree description entries of params' leaves, in flattening order; their tensors are added to `tensors`."""
  entries = []
  for keypath, w in jax.tree_util.tree_flatten_with_path(params, is_leaf=leaf_lib.is_weight_leaf)[0]:
    keys = [_key(k) for k in keypath]
    entries.append({'keys': keys, 'leaf': _encode('/'.join(str(k) for _, k in keys), w, tensors)})
  return entries


def _header(entries: list[dict], metadata: dict[str, Any] | None, sums: dict[str, str]) -> dict[str, str]:
  """The header metadata of a file holding `entries` (in the flattening order of the whole tree), with the
  checksums `load` verifies."""
  tree, user = json.dumps(entries), json.dumps(metadata or {})
  return {'format': FORMAT, 'tree': tree, 'user': user, CHECKSUMS: json.dumps(dict(sorted(sums.items()))),
          TREE_CHECKSUM: _text_digest(tree, user)}


def _tree_order(entry: dict) -> list:
  """Sort key putting the entries of several parts in the order `tree_flatten` gives their merged tree (dict keys
  sorted, list items by index; keys of one container share a type, so they compare)."""
  return [k for _, k in entry['keys']]


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
  return save_parts(path, [lambda: params], metadata)


def save_parts(path: str | os.PathLike, parts: Sequence[Callable[[], Any]],
               metadata: dict[str, Any] | None = None) -> int:
  """`save` of the tree whose disjoint parts the loaders `parts` return (nested dicts, merged key by key, as
  `calibration.compressed_parts` gives an out-of-core compression), holding one part in memory at a time; returns
  the bytes of tensor data written.

  Each part's tensors are appended to a scratch file beside `path` as the part is encoded; the file is then
  written from it (header, then the tensors, largest element size first, by name) under a temporary name and
  moved onto `path`, so a crash never leaves a half file there. The bytes depend only on the merged tree and
  `metadata`, not on how it was split.
  """
  path = os.fspath(path)
  scratch, tmp = f'{path}.data.tmp', f'{path}.tmp'
  entries: list[dict] = []
  where: dict[str, tuple[np.dtype, list[int], int, int]] = {}  # name -> (dtype, shape, scratch offset, bytes)
  sums: dict[str, str] = {}
  try:
    with open(scratch, 'wb') as data:
      for load in parts:  # the part and its tensors are freed before the next one loads
        entries += _append(load(), data, where, sums, path)
    entries.sort(key=_tree_order)
    order = sorted(where, key=lambda n: (-where[n][0].itemsize, n))  # each tensor aligned to its element size
    header: dict[str, Any] = {'__metadata__': _header(entries, metadata, sums)}
    end = 0
    for name in order:
      dtype, shape, _, nbytes = where[name]
      header[name] = {'dtype': _CODE[dtype], 'shape': shape, 'data_offsets': [end, end + nbytes]}
      end += nbytes
    text = json.dumps(header, separators=(',', ':'), ensure_ascii=False).encode()
    text += b' ' * (-len(text) % 8)  # the tensors start 8-byte aligned, as safetensors' own writer pads
    with open(scratch, 'rb') as data, open(tmp, 'wb') as f:
      f.write(len(text).to_bytes(8, 'little') + text)
      for name in order:
        _, _, offset, nbytes = where[name]
        data.seek(offset)
        _copy(data, f, nbytes)
    os.replace(tmp, path)
  finally:
    for leftover in (scratch, tmp):
      if os.path.exists(leftover):
        os.remove(leftover)
  return end


def _append(part: Any, data, where: dict, sums: dict[str, str], path: str) -> list[dict]:
  """Encodes one part, appends its tensors to the scratch file `data` (recording each one's dtype, shape, offset,
  bytes in `where` and its checksum in `sums`); returns its tree description entries."""
  tensors: dict[str, np.ndarray] = {}
  entries = _encode_part(part, tensors)
  for name, t in tensors.items():
    if name in where:
      raise ValueError(f"save_parts: tensor '{name}' is in two parts of the tree written to '{path}'; each leaf "
                       'must come from exactly one part.')
    t = np.ascontiguousarray(t)
    if t.dtype not in _CODE:
      raise TypeError(f"save: tensor '{name}' has dtype {t.dtype}, which safetensors cannot hold; supported: "
                      f'{sorted(str(d) for d in _CODE)}.')
    sums[name] = tensor_digest(t)
    where[name] = (t.dtype, list(t.shape), data.tell(), t.nbytes)
    data.write(t.reshape(-1).view(np.uint8).data)
  return entries


def _copy(src, dst, nbytes: int) -> None:
  """Copies `nbytes` from src's position to dst, `_COPY` bytes at a time."""
  while nbytes:
    chunk = src.read(min(nbytes, _COPY))
    if not chunk:
      raise OSError(f"save: the scratch file '{src.name}' ended early (changed while writing?).")
    dst.write(chunk)
    nbytes -= len(chunk)


def dumps(params: Any) -> bytes:
  """params as safetensors bytes in `save`'s format, in memory (compressed weights sent between processes)."""
  tensors: dict[str, np.ndarray] = {}
  entries = _encode_part(params, tensors)
  header = _header(entries, None, {k: tensor_digest(t) for k, t in tensors.items()})
  return safetensors.numpy.save(tensors, metadata=header)


def loads(data: bytes) -> Any:
  """The parameter tree `dumps` encoded (read through a temporary file: safetensors' in-memory reader has no
  bfloat16 or fp8)."""
  with tempfile.TemporaryDirectory(prefix='jaxcompress-') as d:
    path = os.path.join(d, 'tree.safetensors')
    with open(path, 'wb') as f:
      f.write(data)
    return jax.tree.map(np.asarray, load(path))


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
