"""Byte-level BPE tokenizers trained on a corpus, saved so that transformers loads them.

    tok = train_bpe(docs, vocab_size=4096)
    save_tokenizer(tok, 'out/dir')            # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer('out/dir')           # a tokenizers.Tokenizer
    ids = encode_documents(tok, docs)         # list of int32 arrays, no special tokens added

Byte-level (GPT-2 style) means every string round-trips exactly and nothing is ever unknown.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = '<|endoftext|>'
TOKENIZER_FILE = 'tokenizer.json'
CONFIG_FILE = 'tokenizer_config.json'
BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte


def train_bpe(texts: Sequence[str], *, vocab_size: int = 4096,
              special_tokens: Sequence[str] = (EOS,)) -> Tokenizer:
  """A byte-level BPE tokenizer trained on `texts`; special tokens take ids 0, 1, ... in the order given.

  Deterministic: the same texts give the same vocabulary and merges, whatever the thread count. The trainer
  has no randomness: pair counts are sums (so the order threads add them in does not matter), every base
  symbol gets its id from a sorted alphabet before any merge, and ties between equally frequent pairs are
  broken by those ids. The hash-map ordering that can make BPE training vary between runs only affects
  continuing-subword prefixes and end-of-word suffixes, which byte-level BPE does not use; so thread settings
  (RAYON_NUM_THREADS, TOKENIZERS_PARALLELISM) are left alone. The vocabulary may end up smaller than
  vocab_size when the texts run out of pairs to merge.
  """
  special_tokens = list(special_tokens)
  if len(set(special_tokens)) != len(special_tokens):
    raise ValueError(f'train_bpe: special_tokens={special_tokens} repeats a token; list each once.')
  if vocab_size < BYTE_ALPHABET + len(special_tokens):
    raise ValueError(f'train_bpe: vocab_size={vocab_size} is below the {BYTE_ALPHABET} byte tokens plus '
                     f'{len(special_tokens)} special tokens; use vocab_size >= {BYTE_ALPHABET + len(special_tokens)}.')
  if isinstance(texts, str):
    raise TypeError('train_bpe: texts is a single string; pass a sequence of documents, e.g. [text].')
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  return tok


def special_tokens_of(tok: Tokenizer) -> list[str]:
  """The tokenizer's special tokens, by increasing id."""
  return [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.special]


def token_id(tok: Tokenizer, token: str) -> int:
  """The id of `token`; raises naming the special tokens when the vocabulary lacks it."""
  i = tok.token_to_id(token)
  if i is None:
    raise ValueError(f'token {token!r} is not in the vocabulary; its special tokens are {special_tokens_of(tok)}.')
  return i


def save_tokenizer(tok: Tokenizer, directory: str | os.PathLike, *, eos_token: str | None = None,
                   model_max_length: int | None = None) -> Path:
  """Writes tokenizer.json and tokenizer_config.json, which transformers.AutoTokenizer.from_pretrained reads.

  eos_token defaults to the special token with the lowest id. Returns the directory.
  """
  import transformers

  directory = Path(directory)
  if eos_token is None:
    specials = special_tokens_of(tok)
    if not specials:
      raise ValueError('save_tokenizer: the tokenizer has no special tokens; pass eos_token= naming one of its '
                       'tokens, or train it with special_tokens=(...).')
    eos_token = specials[0]
  token_id(tok, eos_token)
  extra = {} if model_max_length is None else {'model_max_length': model_max_length}
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token, **extra)
  directory.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(directory))
  # transformers adds an empty template post-processor; keep tokenizer.json exactly `tok` (same to_str()).
  tok.save(str(directory / TOKENIZER_FILE))
  # transformers 5 writes its own class name; 'PreTrainedTokenizerFast' also loads there and in transformers 4.
  config_path = directory / CONFIG_FILE
  config = json.loads(config_path.read_text())
  config['tokenizer_class'] = 'PreTrainedTokenizerFast'
  config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
  return directory


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """A tokenizers.Tokenizer from a directory holding tokenizer.json, or from the tokenizer.json file itself."""
  path = Path(path)
  file = path / TOKENIZER_FILE if path.is_dir() else path
  if not file.is_file():
    raise FileNotFoundError(f"load_tokenizer: '{file}' does not exist; give a directory holding "
                            f'{TOKENIZER_FILE} (as written by save_tokenizer) or the path of the file itself.')
  return Tokenizer.from_file(str(file))


def encode_documents(tok: Tokenizer, docs: Sequence[str]) -> list[np.ndarray]:
  """Each document's token ids, [len_i] int32, without special tokens (batch-encoded in parallel)."""
  if isinstance(docs, str):
    raise TypeError('encode_documents: docs is a single string; pass a sequence of documents, e.g. [text].')
  encodings = tok.encode_batch_fast(list(docs), add_special_tokens=False)
  return [np.asarray(e.ids, np.int32) for e in encodings]
