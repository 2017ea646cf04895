"""Model directories: named models, Hugging Face checkpoints, compressed checkpoints and `recipes.compress` runs.

    model_dirs.save_compressed('runs/w4', model, quantized)   # config.json + model.jc.safetensors
    model, params, kind = model_dirs.load('runs/w4')           # kind: 'compressed'
    model, params, kind = model_dirs.load('runs/compress')     # kind: 'run' (compressed.jxc + hf/config.json)
    model, params, kind = model_dirs.load('fixture')           # kind: 'hf' ('fixture', 'minilm' or an HF dir)

A compressed checkpoint keeps masks, codes and low-rank factors as they are (`core.serialize`), so its disk size
is the compressed size; config.json (`model.hf_config()`) says which architecture reads it. A compression run
directory (`experiments/compress.py`, `recipes.compress(output_dir=...)`) holds the same tree as compressed.jxc and
the architecture in hf/config.json.
"""

from __future__ import annotations

import json
import os
import pathlib

COMPRESSED_FILE = 'model.jc.safetensors'  # the name `save_compressed` writes
RUN_FILE = 'compressed.jxc'  # the `core.serialize` file of a compression run directory
RUN_ARCHITECTURE = 'hf'  # the run directory's folder whose config.json gives the architecture
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt')  # any one: a tokenizer directory


def compressed_file(directory: str | os.PathLike) -> pathlib.Path | None:
  """The `core.serialize` file of a compressed-checkpoint directory, or None if the directory holds none."""
  from safetensors import SafetensorError, safe_open

  from jaxcompress.core import serialize
  found = []
  for f in sorted(pathlib.Path(directory).glob('*.safetensors')):
    try:
      with safe_open(str(f), framework='numpy') as handle:
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as e:
      raise ValueError(f"cannot read '{f}': {e}. The file is truncated or corrupt; download or export it "
                       'again.') from None
    if metadata.get('format') == serialize.FORMAT:
      found.append(f)
  if len(found) > 1:
    raise ValueError(f"'{directory}' holds several compressed checkpoints ({', '.join(f.name for f in found)}); "
                     'keep one per directory.')
  return found[0] if found else None


def is_run_dir(directory: str | os.PathLike) -> bool:
  """Whether `directory` is a compression run directory (compressed.jxc written with --save)."""
  path = pathlib.Path(directory).expanduser()
  return (path / RUN_FILE).is_file() and (path / RUN_ARCHITECTURE / 'config.json').is_file()


def source(directory: str | os.PathLike) -> str | None:
  """The model a compression run directory compressed (its config.json's 'model'), or None."""
  try:
    return json.loads((pathlib.Path(directory).expanduser() / 'config.json').read_text()).get('model')
  except (OSError, ValueError, AttributeError):
    return None


def tokenizer_dir(name: str | os.PathLike) -> pathlib.Path | None:
  """The directory holding the tokenizer of a named model or directory: the directory itself when it holds one;
  for a compression run directory, that of the model it compressed (run directories keep no tokenizer); else None."""
  from jaxcompress.recipes import fixture
  if is_run_dir(name):
    origin = source(name)
    return None if origin is None or is_run_dir(origin) else tokenizer_dir(origin)
  try:
    path = fixture.resolve(name)
  except FileNotFoundError:
    return None
  return path if any((path / f).is_file() for f in TOKENIZER_FILES) else None


def save_compressed(directory: str | os.PathLike, model, params, metadata: dict | None = None) -> pathlib.Path:
  """Writes a compressed-checkpoint directory: config.json (the architecture) and `model.jc.safetensors`
  (`core.serialize.save`: compressed leaves kept compressed). `load` reads it back."""
  from jaxcompress import models
  from jaxcompress.core import serialize
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  model.hf_config().save_pretrained(str(out))
  serialize.save(out / COMPRESSED_FILE, params, {**(metadata or {}), **models.hf.online_metadata(model)})
  return out


def load(name: str | os.PathLike):
  """(model spec, params, kind) of a named model or a directory; kind is 'hf', 'compressed' or 'run'."""
  from jaxcompress import models
  from jaxcompress.core import serialize
  from jaxcompress.recipes import fixture
  if is_run_dir(name):
    return (*_load_run(pathlib.Path(name).expanduser()), 'run')
  path = fixture.resolve(name)
  file = compressed_file(path)
  if file is None:
    model, params = fixture.load(name)
    return model, params, 'hf'
  params = serialize.load(file)
  model = models.hf.with_metadata(_architecture(path, params), serialize.user_metadata(file))
  _check(model, params, file, path / 'config.json')
  return model, params, 'compressed'


def _load_run(path: pathlib.Path):
  """(model, params) of a compression run directory: the architecture of hf/, the tree of compressed.jxc."""
  from jaxcompress import models
  from jaxcompress.core import serialize
  from jaxcompress.pruning._src.structured import WIDTHS_FIELD
  from jaxcompress.pruning._src.structured import load as load_narrowed
  params = serialize.load(path / RUN_FILE)
  arch = path / RUN_ARCHITECTURE
  if WIDTHS_FIELD in json.loads((arch / 'config.json').read_text()):  # per-layer widths
    model, _ = load_narrowed(arch)
  else:
    model = models.hf.with_metadata(_architecture(arch, params), serialize.user_metadata(path / RUN_FILE))
  _check(model, params, path / RUN_FILE, arch / 'config.json')
  return model, params


def _architecture(path: pathlib.Path, params):
  """The model spec of `path`/config.json for a compressed tree `params`."""
  import transformers

  from jaxcompress import models
  # The few architecture choices a BERT config leaves to the tensors present (pooler, MLM head).
  present = frozenset(n for key, n in (('pooler', 'pooler.dense.weight'), ('mlm_head', 'cls.predictions.bias'))
                      if key in params)
  hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
  families = models.supported_model_types()
  if hf_cfg.model_type not in families:
    raise ValueError(f"'{path / 'config.json'}': model_type {hf_cfg.model_type!r} is not supported; supported: "
                     f'{sorted(families)}.')
  return families[hf_cfg.model_type].from_hf_config(hf_cfg, present)


def _check(model, params, file, config) -> None:
  """A ValueError naming both files when the tree's paths are not the architecture's."""
  from jaxcompress import core
  have = set(core.flatten(core.resolve(params)))
  want = set(core.flatten(model.abstract_params()))
  if have != want:
    raise ValueError(f"'{file}' does not match '{config}': missing {sorted(want - have)[:5]}, "
                     f'unexpected {sorted(have - want)[:5]}.')
