"""Model directories the experiments read and write: named models, Hugging Face checkpoints and compressed
checkpoints (no flags here, so any script can import it).

    model_dirs.save_compressed('runs/w4', model, quantized)   # config.json + model.jc.safetensors
    model, params, kind = model_dirs.load('runs/w4')           # kind: 'compressed'
    model, params, kind = model_dirs.load('fixture')           # kind: 'hf' ('fixture', 'minilm' or an HF dir)

A compressed checkpoint keeps masks, codes and low-rank factors as they are (`core.serialize`), so its disk size
is the compressed size; config.json (`model.hf_config()`) says which architecture reads it.
"""

from __future__ import annotations

import os
import pathlib

COMPRESSED_FILE = 'model.jc.safetensors'  # the name `save_compressed` writes


def compressed_file(directory: str | os.PathLike) -> pathlib.Path | None:
  """The `core.serialize` file of a compressed-checkpoint directory, or None if the directory holds none."""
  from safetensors import safe_open

  from jaxcompress.core import serialize
  found = []
  for f in sorted(pathlib.Path(directory).glob('*.safetensors')):
    with safe_open(str(f), framework='numpy') as handle:
      if (handle.metadata() or {}).get('format') == serialize.FORMAT:
        found.append(f)
  if len(found) > 1:
    raise ValueError(f"'{directory}' holds several compressed checkpoints ({', '.join(f.name for f in found)}); "
                     'keep one per directory.')
  return found[0] if found else None


def check_model_arg(flag: str, name: str | None) -> pathlib.Path:
  """The directory of a --model / --reference value, or a ValueError naming the flag, the value and the fix."""
  from experiments import fixture
  if not name:
    raise ValueError(f"--{flag} is required: 'fixture', 'minilm', a Hugging Face checkpoint directory or a "
                     'compressed-checkpoint directory.')
  if name not in fixture.NAMES and not pathlib.Path(name).expanduser().is_dir():
    raise ValueError(f"--{flag}={name!r}: the directory '{name}' does not exist; give 'fixture', 'minilm' or an "
                     'existing checkpoint directory.')
  try:
    path = fixture.resolve(name)
  except FileNotFoundError as e:
    raise ValueError(f'--{flag}: {e}') from None
  if not list(path.glob('*.safetensors')) and not (path / 'model.safetensors.index.json').exists():
    raise ValueError(f"--{flag}={name!r}: '{path}' has config.json but no safetensors weights.")
  return path


def save_compressed(directory: str | os.PathLike, model, params, metadata: dict | None = None) -> pathlib.Path:
  """Writes a compressed-checkpoint directory: config.json (the architecture) and `model.jc.safetensors`
  (`core.serialize.save`: compressed leaves kept compressed). `load` reads it back."""
  from jaxcompress.core import serialize
  out = pathlib.Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  model.hf_config().save_pretrained(str(out))
  serialize.save(out / COMPRESSED_FILE, params, metadata)
  return out


def load(name: str | os.PathLike):
  """(model spec, params, kind) of a --model / --reference value; kind is 'hf' or 'compressed'."""
  import transformers

  from experiments import fixture
  from jaxcompress import core, models
  from jaxcompress.core import serialize
  path = fixture.resolve(name)
  file = compressed_file(path)
  if file is None:
    model, params = fixture.load(name)
    return model, params, 'hf'
  params = serialize.load(file)
  # The few architecture choices a BERT config leaves to the tensors present (pooler, MLM head).
  present = frozenset(n for key, n in (('pooler', 'pooler.dense.weight'), ('mlm_head', 'cls.predictions.bias'))
                      if key in params)
  hf_cfg = transformers.AutoConfig.from_pretrained(str(path))
  families = models.supported_model_types()
  if hf_cfg.model_type not in families:
    raise ValueError(f"'{path / 'config.json'}': model_type {hf_cfg.model_type!r} is not supported; supported: "
                     f'{sorted(families)}.')
  model = families[hf_cfg.model_type].from_hf_config(hf_cfg, present)
  have = set(core.flatten(core.resolve(params)))
  want = set(core.flatten(model.abstract_params()))
  if have != want:
    raise ValueError(f"'{file}' does not match '{path / 'config.json'}': missing {sorted(want - have)[:5]}, "
                     f'unexpected {sorted(have - want)[:5]}.')
  return model, params, 'compressed'
