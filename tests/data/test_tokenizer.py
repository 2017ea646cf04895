"""Byte-level BPE: determinism (also across thread counts), exact round trips, and loading via transformers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxcompress.data import tokenizer as tokenizer_lib

_WORDS = ('the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial boxers and '
          'programmers debug their compilers before lunch on rainy afternoons').split()


def small_texts(n: int = 300) -> list[str]:
  """n short English-like documents, the same every call."""
  rng = np.random.default_rng(0)
  return [' '.join(rng.choice(_WORDS, size=int(rng.integers(3, 30)))).capitalize() + '.' for _ in range(n)]


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.train_bpe(small_texts(), vocab_size=400)


def test_training_is_deterministic(tok):
  again = tokenizer_lib.train_bpe(small_texts(), vocab_size=400)
  assert again.to_str() == tok.to_str()
  assert 300 < tok.get_vocab_size() <= 400  # training stops early when no pair is left to merge
  assert tok.token_to_id(tokenizer_lib.EOS) == 0
  other = tokenizer_lib.train_bpe(small_texts()[::-1][:150], vocab_size=400)
  assert other.to_str() != tok.to_str()


_TRAIN_IN_SUBPROCESS = """
import hashlib
from tests.data.test_tokenizer import small_texts
from jaxcompress.data.tokenizer import train_bpe
print(hashlib.sha256(train_bpe(small_texts(), vocab_size=400).to_str().encode()).hexdigest())
"""


@pytest.mark.subprocess
def test_training_is_deterministic_across_thread_counts(tok):
  expected = hashlib.sha256(tok.to_str().encode()).hexdigest()
  for threads in ('1', '4'):
    env = {**os.environ, 'RAYON_NUM_THREADS': threads, 'TOKENIZERS_PARALLELISM': 'true'}
    out = subprocess.run([sys.executable, '-c', _TRAIN_IN_SUBPROCESS], env=env, check=True,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.stdout.split()[-1] == expected, f'RAYON_NUM_THREADS={threads}'


def test_special_tokens_come_first():
  t = tokenizer_lib.train_bpe(small_texts(50), vocab_size=300, special_tokens=('<|endoftext|>', '<|pad|>'))
  assert [t.token_to_id('<|endoftext|>'), t.token_to_id('<|pad|>')] == [0, 1]
  assert tokenizer_lib.special_tokens_of(t) == ['<|endoftext|>', '<|pad|>']
  with pytest.raises(ValueError, match='vocab_size=100'):
    tokenizer_lib.train_bpe(small_texts(5), vocab_size=100)
  with pytest.raises(ValueError, match='repeats'):
    tokenizer_lib.train_bpe(small_texts(5), special_tokens=('<a>', '<a>'))
  with pytest.raises(TypeError, match='single string'):
    tokenizer_lib.train_bpe('one long string')


@pytest.mark.parametrize('text', [
    'The quick brown fox.',
    '  leading and trailing spaces  ',
    'tabs\tand\nnew lines\r\n and "quotes", (brackets) & symbols: ~!@#$%^*_+={}[]|\\;<>?/',
    'words never seen in training: zyzzyva quixotic',
    '',
])
def test_round_trip_ascii(tok, text):
  ids = tok.encode(text).ids
  assert tok.decode(ids) == text
  assert tokenizer_lib.EOS not in tok.encode(text).tokens


def test_round_trip_non_ascii(tok):
  text = 'naïve café — 東京 🙂'
  assert tok.decode(tok.encode(text).ids) == text


def test_encode_documents(tok):
  docs = ['The lazy dog.', '', 'Jovial boxers debug compilers.']
  encoded = tokenizer_lib.encode_documents(tok, docs)
  assert [e.dtype for e in encoded] == [np.int32] * 3
  for doc, ids in zip(docs, encoded):
    np.testing.assert_array_equal(ids, tok.encode(doc).ids)
  assert encoded[1].shape == (0,)
  with pytest.raises(TypeError, match='single string'):
    tokenizer_lib.encode_documents(tok, 'The lazy dog.')


def test_save_load_through_transformers(tok, tmp_path):
  import transformers

  tokenizer_lib.save_tokenizer(tok, tmp_path / 'tok', model_max_length=128)
  assert {'tokenizer.json', 'tokenizer_config.json'} <= {p.name for p in (tmp_path / 'tok').iterdir()}
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'tok'))
  text = 'The quick brown fox jumps over a lazy dog.'
  assert hf(text)['input_ids'] == tok.encode(text).ids
  assert hf.decode(hf(text)['input_ids']) == text
  assert hf.eos_token == tokenizer_lib.EOS and hf.eos_token_id == 0
  assert hf.model_max_length == 128
  for path in (tmp_path / 'tok', tmp_path / 'tok' / 'tokenizer.json'):
    assert tokenizer_lib.load_tokenizer(path).to_str() == tok.to_str()


def test_load_and_save_errors(tok, tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    tokenizer_lib.load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match="'<missing>' is not in the vocabulary"):
    tokenizer_lib.save_tokenizer(tok, tmp_path / 'x', eos_token='<missing>')
