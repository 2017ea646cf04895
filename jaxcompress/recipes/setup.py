"""What a compression run starts from: the model, its calibration and training batches and its evaluation data.

    from jaxcompress.recipes import setup
    s = setup.load('fixture', calib_samples=512, eval_samples=256)   # or 'minilm', 'tiny', a checkpoint directory
    s.model, s.params, s.calib, s.train, s.eval_tokens

Causal LMs calibrate on training rows and are evaluated on held-out rows [N, T + 1]; encoders calibrate on
fortunes sentences and are evaluated on the following ones, tokenized to [N, seq_len] with their mask.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from jaxcompress.recipes.preflight import PreflightError

MODELS = ('minilm', 'fixture', 'tiny')  # the named models `load` takes besides a checkpoint directory


@dataclasses.dataclass(frozen=True)
class EncoderBatches:
  """Random-access encoder training batches {'inputs', 'attention_mask'} [B, T] from fixed tokenized sentences."""
  tokens: np.ndarray  # [N, T] int32
  mask: np.ndarray  # [N, T] int32
  batch_size: int
  seed: int

  def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    rows = np.random.default_rng([self.seed, step]).choice(len(self.tokens), self.batch_size, replace=False)
    rows = np.array_split(rows, process_count)[process_index]
    return {'inputs': self.tokens[rows], 'attention_mask': self.mask[rows]}


def sentences(n: int, skip: int = 0) -> list[str]:
  """n sentences (one per fortune, its first line of 20+ characters) from the fortunes corpus, after `skip`."""
  from jaxcompress.data import corpus
  out = []
  for doc in corpus.fortunes_documents():
    line = next((s.strip() for s in doc.splitlines() if len(s.strip()) >= 20), None)
    if line:
      out.append(line)
    if len(out) >= skip + n:
      break
  if len(out) < skip + n:
    raise ValueError(f'the fortunes corpus has {len(out)} sentences; asked for {skip + n}.')
  return out[skip:skip + n]


def _texts(spec: str, n: int, skip: int, param: str) -> list[str]:
  if spec == 'default':
    return sentences(n, skip)
  path = pathlib.Path(spec)
  if path.suffix != '.txt' or not path.is_file():
    raise PreflightError(f"{param}={spec!r}: an encoder takes 'default' or an existing .txt file (one text per "
                         'line).')
  lines = [s for s in path.read_text().splitlines() if s.strip()]
  if len(lines) < n:
    samples = param.replace('_data', '_samples')
    raise PreflightError(f'{param}={spec!r} has {len(lines)} non-empty lines; {samples}={n} asked for more. Lower '
                         f'{samples} or give a longer file.')
  return lines[:n]


def _rows(spec: str, default: np.ndarray, n: int, model, param: str) -> np.ndarray:
  """The first n token rows [n, T + 1] int32 of 'default' or of a .npy file, checked against the model's
  vocabulary before the cast (float files are refused, not cast; an int64 id past int32 would wrap)."""
  if spec == 'default':
    rows = default
  else:
    path = pathlib.Path(spec)
    if path.suffix != '.npy' or not path.is_file():
      raise PreflightError(f"{param}={spec!r}: a causal LM takes 'default' or an existing .npy of token rows "
                           '[N, T + 1].')
    rows = np.load(path, allow_pickle=False)
    if rows.ndim != 2:
      raise PreflightError(f'{param}={spec!r}: rows of shape {rows.shape}; expected a 2-D array [N, T + 1] of '
                           'token ids.')
    if len(rows) < n:
      samples = param.replace('_data', '_samples')
      raise PreflightError(f'{param}={spec!r} has {len(rows)} rows; {samples}={n} asked for more. Lower {samples} '
                           'or give more rows.')
  from jaxcompress.models import ids
  try:
    ids.check_tokens(model, rows[:n], name='token rows', where=f'{param}={spec!r}: ')
  except ValueError as e:
    raise PreflightError(str(e)) from None
  return rows[:n].astype(np.int32)


def tiny_model(seed: int):
  """(model, params) of a random 2-layer Llama (vocabulary 64, 32 wide): a run in seconds."""
  import jax

  from jaxcompress import models
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=64))
  return model, jax.jit(model.init)(jax.random.key(seed))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
  """A model with its data, as `load` gives it."""
  name: str  # how results and reports name the model ('tiny', 'fixture', a directory, ...)
  model: Any  # the model spec
  params: Any  # its uncompressed params
  causal: bool  # causal LM (perplexity) or encoder (embedding cosine)
  calib: list  # calibration batches {'tokens' [B, T] int32, encoders also 'attention_mask'}
  train: Any  # training batches (`.batch(step)`)
  eval_tokens: np.ndarray  # encoder [N, T] or causal rows [N, T + 1]
  eval_mask: np.ndarray | None  # encoder [N, T] attention mask; None for causal LMs

  def __post_init__(self):
    """Evaluation ids are checked here, once: the evaluation runs them inside jit, where an id outside the
    vocabulary would give a NaN perplexity or cosine. Calibration and training batches are checked where they
    are consumed (the calibration driver, the training loop)."""
    from jaxcompress.models import ids
    ids.check_tokens(self.model, self.eval_tokens, name='eval_tokens', where=f'setup {self.name!r}: ')
    if self.eval_mask is not None and np.shape(self.eval_mask) != np.shape(self.eval_tokens):
      raise ValueError(f'setup {self.name!r}: eval_mask has shape {np.shape(self.eval_mask)} but eval_tokens '
                       f'{np.shape(self.eval_tokens)}; give one 1/0 per token (1 real, 0 padding).')


def load(model_name: str, *, calib_data: str = 'default', eval_data: str = 'default', calib_samples: int = 512,
         eval_samples: int = 256, seq_len: int = 64, batch_size: int = 32, seed: int = 0) -> Setup:
  """The model, its calibration/training batches and evaluation data.

  model_name: 'minilm', 'fixture', 'tiny' or a checkpoint directory. calib_data / eval_data: 'default' (fortunes
  sentences for encoders, the fixture's training / held-out rows for causal LMs), a .txt file (encoders, one text
  per line) or a .npy of token rows [N, T + 1] (causal LMs). seq_len: tokens per encoder sentence.
  """
  from jaxcompress.data import pipeline
  from jaxcompress.recipes import fixture
  if model_name == 'tiny':
    model, params = tiny_model(seed)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 64, (64, 17)).astype(np.int32)
    train_rows = _rows(calib_data, rows[:48], calib_samples, model, 'calib_data')
    eval_rows = _rows(eval_data, rows[48:], eval_samples, model, 'eval_data')
    train = pipeline.LMBatches(sequences=train_rows, batch_size=min(batch_size, len(train_rows)), seed=seed)
  else:
    model, params = fixture.load(model_name)
    if model.causal:
      _, train, held_out = fixture.data(fixture.resolve(model_name))
      train_rows = _rows(calib_data, train.sequences, calib_samples, model, 'calib_data')
      eval_rows = _rows(eval_data, held_out, eval_samples, model, 'eval_data')
      train = pipeline.LMBatches(sequences=train.sequences, batch_size=min(batch_size, 16), seed=seed)
  if model.causal:
    calib = [{'tokens': train_rows[i:i + batch_size, :-1]} for i in range(0, len(train_rows), batch_size)]
    return Setup(name=str(model_name), model=model, params=params, causal=True, calib=calib, train=train,
                 eval_tokens=eval_rows, eval_mask=None)
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(fixture.resolve(model_name)))

  def encode(texts):
    b = tokenizer(texts, padding='max_length', truncation=True, max_length=seq_len, return_tensors='np')
    return b['input_ids'].astype(np.int32), b['attention_mask'].astype(np.int32)

  calib_tok, calib_mask = encode(_texts(calib_data, calib_samples, 0, 'calib_data'))
  eval_tok, eval_mask = encode(_texts(eval_data, eval_samples, calib_samples if calib_data == 'default' else 0,
                                      'eval_data'))
  calib = [{'tokens': calib_tok[i:i + batch_size], 'attention_mask': calib_mask[i:i + batch_size]}
           for i in range(0, len(calib_tok), batch_size)]
  train = EncoderBatches(calib_tok, calib_mask, min(batch_size, len(calib_tok)), seed)
  return Setup(name=str(model_name), model=model, params=params, causal=False, calib=calib, train=train,
               eval_tokens=eval_tok, eval_mask=eval_mask)
