"""Compact safetensors files for compressed parameter trees (the "disk" column of `core.stats`).

Each weight becomes one or more named tensors; a JSON description of the tree and of every leaf's format goes
in the safetensors header metadata. On disk, quantized codes are packed to exactly `bits` bits each, masked
weights keep only their kept values plus a one-bit-per-entry map, and shared storage is written once. No
pickle: loading reads tensors and JSON only.

    save('model.jc.safetensors', params)
    params = load('model.jc.safetensors')
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core.lowrank import LoRA, LowRank
from jaxcompress.core.masked import Masked
from jaxcompress.core.quantized import Quantized, pack_codes
from jaxcompress.core.shared import Shared

FORMAT = 'jaxcompress/1'


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
  """Unsigned codes < 2**bits -> uint8 bytes holding exactly ceil(n * bits / 8) bytes, little-endian bits."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  planes = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder='little')


def unpack_bits(data: np.ndarray, bits: int, n: int) -> np.ndarray:
  planes = np.unpackbits(data, count=n * bits, bitorder='little').reshape(n, bits)
  return (planes.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1).astype(np.uint8)


def _host(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def _encode(name: str, w: Any, tensors: dict[str, np.ndarray]) -> dict:
  """Adds w's tensors under `name`; returns its JSON description."""
  if isinstance(w, Masked):
    mask = _host(w.mask).astype(bool)
    tensors[name + '.bitmap'] = np.packbits(mask.reshape(-1), bitorder='little')
    desc = {'kind': 'masked', 'mask_shape': list(mask.shape)}
    if leaf_lib.is_compressed(w.value):
      desc['value'] = _encode(name + '.value', w.value, tensors)
    else:
      value = _host(w.value)
      tensors[name + '.kept'] = value[np.broadcast_to(mask, value.shape)]
      desc['value'] = {'kind': 'kept', 'shape': list(value.shape), 'dtype': str(value.dtype)}
    return desc
  if isinstance(w, Quantized):
    codes = _host(w.codes_unpacked())
    if w.fmt == 'fp8':
      tensors[name + '.codes'] = codes.view(np.uint8).reshape(-1)
    else:
      tensors[name + '.codes'] = pack_bits(codes, w.bits)
    for field in ('scale', 'zero', 'codebook'):
      if getattr(w, field) is not None:
        tensors[f'{name}.{field}'] = _host(getattr(w, field))
    return {'kind': 'quantized', 'bits': w.bits, 'group_size': w.group_size, 'fmt': w.fmt, 'packed': w.packed,
            'shape': list(w.shape), 'fields': [f for f in ('scale', 'zero', 'codebook')
                                               if getattr(w, f) is not None]}
  if isinstance(w, LowRank):
    return {'kind': 'lowrank', 'a': _encode(name + '.a', w.a, tensors), 'b': _encode(name + '.b', w.b, tensors)}
  if isinstance(w, LoRA):
    return {'kind': 'lora', 'scale': w.scale, 'base': _encode(name + '.base', w.base, tensors),
            'lora_a': _encode(name + '.lora_a', w.lora_a, tensors),
            'lora_b': _encode(name + '.lora_b', w.lora_b, tensors)}
  if isinstance(w, Shared):
    return {'kind': 'shared', 'name': w.name, 'shape': list(w.shape), 'dtype': w.ref_dtype}
  if leaf_lib.is_compressed(w):
    raise TypeError(f"save: no on-disk format for {type(w).__name__} at '{name}'.")
  tensors[name] = _host(w)
  return {'kind': 'dense'}


def _decode(name: str, desc: dict, f) -> Any:
  kind = desc['kind']
  if kind == 'dense':
    return jnp.asarray(f.get_tensor(name))
  if kind == 'masked':
    shape = tuple(desc['mask_shape'])
    mask = np.unpackbits(f.get_tensor(name + '.bitmap'), count=math.prod(shape), bitorder='little')
    mask = mask.astype(bool).reshape(shape)
    vdesc = desc['value']
    if vdesc['kind'] == 'kept':
      vshape = tuple(vdesc['shape'])
      value = np.zeros(vshape, np.dtype(vdesc['dtype']))
      value[np.broadcast_to(mask, vshape)] = f.get_tensor(name + '.kept')
      value = jnp.asarray(value)
    else:
      value = _decode(name + '.value', vdesc, f)
    return Masked(value=value, mask=jnp.asarray(mask))
  if kind == 'quantized':
    shape, bits = tuple(desc['shape']), desc['bits']
    raw = f.get_tensor(name + '.codes')
    if desc['fmt'] == 'fp8':
      codes = jnp.asarray(raw.view(ml_dtypes.float8_e4m3fn).reshape(shape))
    else:
      codes = jnp.asarray(unpack_bits(raw, bits, math.prod(shape)).reshape(shape))
      if desc['packed']:
        codes = pack_codes(codes, bits)
    side = {k: (jnp.asarray(f.get_tensor(f'{name}.{k}')) if k in desc['fields'] else None)
            for k in ('scale', 'zero', 'codebook')}
    return Quantized(codes=codes, **side, bits=bits, group_size=desc['group_size'], fmt=desc['fmt'],
                     packed=desc['packed'], logical_shape=shape)
  if kind == 'lowrank':
    return LowRank(a=_decode(name + '.a', desc['a'], f), b=_decode(name + '.b', desc['b'], f))
  if kind == 'lora':
    return LoRA(base=_decode(name + '.base', desc['base'], f), lora_a=_decode(name + '.lora_a', desc['lora_a'], f),
                lora_b=_decode(name + '.lora_b', desc['lora_b'], f), scale=desc['scale'])
  if kind == 'shared':
    return Shared(name=desc['name'], ref_shape=tuple(desc['shape']), ref_dtype=desc['dtype'])
  raise ValueError(f"load: unknown leaf kind {kind!r} at '{name}'; the file may come from a newer version.")


def save(path: str | os.PathLike, params: Any, metadata: dict[str, Any] | None = None) -> int:
  """Writes params; returns the bytes of tensor data written (equals `stats.totals(params).disk`)."""
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=leaf_lib.is_weight_leaf)[0]
  tensors: dict[str, np.ndarray] = {}
  entries = []
  for keypath, w in leaves:
    keys = [_key(k) for k in keypath]
    name = '/'.join(str(k) for _, k in keys)
    entries.append({'keys': keys, 'leaf': _encode(name, w, tensors)})
  header = {'format': FORMAT, 'tree': json.dumps(entries), 'user': json.dumps(metadata or {})}
  tmp = f'{os.fspath(path)}.tmp'
  save_file(tensors, tmp, metadata=header)
  os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
  return sum(t.nbytes for t in tensors.values())


def load(path: str | os.PathLike) -> Any:
  """Reads a file written by `save` back into the same parameter tree."""
  try:
    f = safe_open(os.fspath(path), framework='numpy')
  except (SafetensorError, OSError) as e:
    raise ValueError(f"load: '{path}' is not a readable safetensors file ({e}); it may be truncated.") from None
  meta = f.metadata() or {}
  if meta.get('format') != FORMAT:
    raise ValueError(f"load: '{path}' has format {meta.get('format')!r}, not {FORMAT!r}; for Hugging Face "
                     'checkpoints use jaxcompress.models.from_pretrained.')
  tree: dict = {}
  kinds: dict[int, str] = {}  # id(container) -> 'dict' | 'list' | 'tuple'
  for entry in json.loads(meta['tree']):
    keys = entry['keys']
    node = tree
    for i, (kind, k) in enumerate(keys):
      kinds[id(node)] = kind
      if i == len(keys) - 1:
        node[k] = _decode('/'.join(str(k) for _, k in keys), entry['leaf'], f)
      else:
        node = node.setdefault(k, {})
  return _containers(tree, kinds)


def user_metadata(path: str | os.PathLike) -> dict[str, Any]:
  with safe_open(os.fspath(path), framework='numpy') as f:
    return json.loads((f.metadata() or {}).get('user', '{}'))


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
