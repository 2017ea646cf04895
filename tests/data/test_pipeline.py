"""Packing against a plain NumPy reference; step-addressed batches; the token cache; the one-call fortunes data."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from jaxcompress.data import corpus, pipeline
from jaxcompress.data.pipeline import LMBatches, pack

EOS = 0


def random_docs(seed: int, n: int = 40, max_len: int = 30) -> list[np.ndarray]:
  """Documents of ids in [1, 500) (so EOS = 0 only appears where packing puts it), some empty."""
  rng = np.random.default_rng(seed)
  return [rng.integers(1, 500, size=int(rng.integers(0, max_len))).astype(np.int32) for _ in range(n)]


def reference_pack(docs: list[np.ndarray], seq_len: int, eos_id: int) -> tuple[np.ndarray, list[int]]:
  """Row i = stream[i * seq_len : i * seq_len + seq_len + 1], built one token at a time."""
  stream: list[int] = []
  for doc in docs:
    stream.extend(int(t) for t in doc)
    stream.append(eos_id)
  rows = [stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(len(stream))]
  return np.asarray([r for r in rows if len(r) == seq_len + 1], np.int32), stream


@pytest.mark.parametrize('seq_len', [1, 3, 16, 64])
@pytest.mark.parametrize('seed', [0, 1])
def test_pack_matches_reference(seq_len, seed):
  docs = random_docs(seed)
  rows = pack(docs, seq_len=seq_len, eos_id=EOS)
  expected, stream = reference_pack(docs, seq_len, EOS)
  assert rows.dtype == np.int32 and rows.shape == (len(expected), seq_len + 1)
  np.testing.assert_array_equal(rows, expected)
  n = rows.shape[0]
  # Every stream token after the first is a target exactly once, in order; the remainder is dropped.
  np.testing.assert_array_equal(rows[:, 1:].ravel(), stream[1:1 + n * seq_len])
  np.testing.assert_array_equal(rows[:, :-1].ravel(), stream[:n * seq_len])
  assert 0 <= len(stream) - (n * seq_len + 1) < seq_len
  # EOS follows each document: its stream positions are the cumulative document ends.
  ends = np.cumsum([len(d) + 1 for d in docs]) - 1
  covered = ends[ends <= n * seq_len]
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(stream[:n * seq_len + 1]) == EOS), covered)


def test_pack_errors():
  with pytest.raises(ValueError, match='fewer than the seq_len \\+ 1 = 9'):
    pack([np.arange(1, 5)], seq_len=8, eos_id=EOS)
  assert pack([np.arange(1, 8)], seq_len=7, eos_id=EOS).shape == (1, 8)  # 7 tokens + EOS fill one row
  with pytest.raises(ValueError, match='seq_len=0'):
    pack([np.arange(1, 5)], seq_len=0, eos_id=EOS)
  with pytest.raises(ValueError, match='eos_id=-1'):
    pack([np.arange(1, 5)], seq_len=2, eos_id=-1)
  with pytest.raises(ValueError, match='document 1 has shape \\(2, 2\\)'):
    pack([np.arange(3), np.zeros((2, 2), int)], seq_len=2, eos_id=EOS)
  with pytest.raises(ValueError, match='document 0 holds ids'):
    pack([np.asarray([-3, 1])], seq_len=1, eos_id=EOS)
  with pytest.raises(ValueError, match='fewer than'):
    pack([], seq_len=1, eos_id=EOS)


def rows_of(n: int, seq_len: int = 4) -> np.ndarray:
  """[n, seq_len + 1] rows whose first token is the row number (so rows are easy to identify)."""
  rows = np.arange(n * (seq_len + 1), dtype=np.int32).reshape(n, seq_len + 1) % 1000
  rows[:, 0] = np.arange(n)
  return rows


def reference_rows(seed: int, n: int, batch_size: int, step: int) -> np.ndarray:
  """Rows [step * B, (step + 1) * B) of the concatenated epoch permutations."""
  order_key = jax.random.fold_in(jax.random.key(seed), pipeline.ORDER_STREAM)
  last_epoch = ((step + 1) * batch_size - 1) // n
  stream = np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(order_key, e), n))
                           for e in range(last_epoch + 1)])
  return stream[step * batch_size:(step + 1) * batch_size]


def test_batch_contents_and_format():
  seqs = rows_of(10)
  data = LMBatches(sequences=seqs, batch_size=4, seed=3)
  batch = data.batch(2)
  rows = reference_rows(3, 10, 4, 2)
  assert set(batch) == {'inputs', 'targets', 'mask'}
  assert batch['inputs'].dtype == np.int32 and batch['targets'].dtype == np.int32
  assert batch['mask'].dtype == np.float32 and batch['mask'].shape == (4, 4) and (batch['mask'] == 1).all()
  np.testing.assert_array_equal(batch['inputs'], seqs[rows, :-1])
  np.testing.assert_array_equal(batch['targets'], seqs[rows, 1:])
  assert data.seq_len == 4 and data.tokens_per_batch == 16 and data.steps_per_epoch == 2


def test_same_seed_same_batches_different_seed_different():
  seqs = rows_of(50)
  a, b = LMBatches(sequences=seqs, batch_size=8, seed=0), LMBatches(sequences=seqs, batch_size=8, seed=0)
  c = LMBatches(sequences=seqs, batch_size=8, seed=1)
  for step in range(20):
    np.testing.assert_array_equal(a.batch(step)['inputs'], b.batch(step)['inputs'])
  assert any((a.rows(s) != c.rows(s)).any() for s in range(5))


def test_random_access_equals_sequential_iteration():
  seqs = rows_of(23)
  data = LMBatches(sequences=seqs, batch_size=6, seed=5)
  sequential = [data.rows(step) for step in range(30)]
  for step in np.random.default_rng(0).permutation(30):
    resumed = LMBatches(sequences=seqs, batch_size=6, seed=5)  # a restarted job reading from this step on
    np.testing.assert_array_equal(resumed.rows(int(step)), sequential[step])
    np.testing.assert_array_equal(sequential[step], reference_rows(5, 23, 6, int(step)))


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_process_shards_concatenate_to_global_batch(process_count):
  seqs = rows_of(30)
  data = LMBatches(sequences=seqs, batch_size=8, seed=0)
  for step in (0, 3, 7):  # step 3 straddles epochs 0 and 1
    whole = data.batch(step)
    parts = [data.batch(step, process_index=p, process_count=process_count) for p in range(process_count)]
    assert all(part['inputs'].shape == (8 // process_count, 4) for part in parts)
    for k in whole:
      np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), whole[k])


def test_each_epoch_covers_every_row_once():
  n, batch_size = 10, 4  # batches straddle epoch boundaries: 4 does not divide 10
  data = LMBatches(sequences=rows_of(n), batch_size=batch_size, seed=0)
  stream = np.concatenate([data.rows(step) for step in range(15)])  # 60 rows = 6 epochs
  epochs = stream.reshape(6, n)
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  assert len({tuple(order) for order in epochs}) > 1  # a fresh shuffle each epoch
  assert data.epoch(5) == 2.0


def test_lm_batches_validation():
  seqs = rows_of(8)
  with pytest.raises(ValueError, match='batch_size=9 must lie in \\[1, 8\\]'):
    LMBatches(sequences=seqs, batch_size=9, seed=0)
  with pytest.raises(ValueError, match='batch_size=0'):
    LMBatches(sequences=seqs, batch_size=0, seed=0)
  with pytest.raises(ValueError, match='batch_size=2.0'):
    LMBatches(sequences=seqs, batch_size=2.0, seed=0)
  with pytest.raises(ValueError, match="seed='0'"):
    LMBatches(sequences=seqs, batch_size=2, seed='0')
  with pytest.raises(ValueError, match='2-D integer'):
    LMBatches(sequences=seqs.astype(np.float32), batch_size=2, seed=0)
  with pytest.raises(ValueError, match='rows of 1 tokens'):
    LMBatches(sequences=seqs[:, :1], batch_size=2, seed=0)
  data = LMBatches(sequences=seqs, batch_size=6, seed=0)
  with pytest.raises(ValueError, match='process_count=4'):
    data.batch(0, process_count=4)
  with pytest.raises(ValueError, match='process_index=2'):
    data.batch(0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='step=-1'):
    data.batch(-1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    data.batch_size = 2


def test_cache_key_is_unambiguous():
  key = pipeline.cache_key
  assert key(['ab', 'c']) != key(['a', 'bc'])
  assert key([1]) != key(['1']) != key([b'1'])
  assert key(['x', 2]) == key(['x', np.int64(2)])
  with pytest.raises(TypeError, match='list'):
    key([[1]])


def test_token_cache_builds_once_and_survives_corruption(tmp_path):
  calls = []

  def build():
    calls.append(1)
    return np.arange(12, dtype=np.int32).reshape(3, 4)

  first = pipeline.token_cache(['a', 1], build, tmp_path)
  second = pipeline.token_cache(['a', 1], build, tmp_path)
  np.testing.assert_array_equal(first, second)
  assert second.dtype == np.int32 and len(calls) == 1
  files = list(tmp_path.iterdir())
  assert len(files) == 1 and files[0].suffix == '.npy'  # no temporary files left behind
  pipeline.token_cache(['a', 2], build, tmp_path)
  assert len(calls) == 2
  files[0].write_bytes(b'\x93NUMPY truncated')
  np.testing.assert_array_equal(pipeline.token_cache(['a', 1], build, tmp_path), first)
  assert len(calls) == 3
  with pytest.raises(TypeError, match='numeric np.ndarray'):
    pipeline.token_cache(['b'], lambda: [1, 2], tmp_path)


def test_fortunes_lm_data_end_to_end(fortunes_cache, tmp_path):
  """The one test that tokenizes the whole corpus; the corpus is shared, tokenizer and tokens are not."""
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / corpus.FORTUNES_SUBDIR).symlink_to(fortunes_cache / corpus.FORTUNES_SUBDIR)
  kwargs = dict(seq_len=64, batch_size=16, vocab_size=512, seed=0, cache_dir=cache)
  tok, train, valid = pipeline.fortunes_lm_data(**kwargs)
  assert tok.get_vocab_size() == 512
  assert train.sequences.shape[1] == valid.shape[1] == 65 and valid.dtype == np.int32
  assert train.sequences.shape[0] > 10 * valid.shape[0] > 100
  assert len(list((cache / 'tokenizers').iterdir())) == 1 and len(list((cache / 'tokens').iterdir())) == 2
  eos = tok.token_to_id('<|endoftext|>')
  train_docs, _ = corpus.split_documents(corpus.fortunes_documents(cache), valid_fraction=0.05, seed=0)
  assert train_docs[0].startswith(tok.decode(train.sequences[0, :16].tolist()))  # rows unshuffled on disk
  n_eos = int((train.sequences[:, 1:] == eos).sum())  # one per train document, less the dropped remainder
  assert len(train_docs) - 64 < n_eos <= len(train_docs)
  batch = train.batch(0)
  assert batch['inputs'].shape == (16, 64)
  text = tok.decode(batch['inputs'][0].tolist())
  assert sum(c.isalpha() for c in text) > 0.5 * len(text)
  tok2, train2, valid2 = pipeline.fortunes_lm_data(**kwargs)  # from the cache
  assert tok2.to_str() == tok.to_str()
  np.testing.assert_array_equal(train2.sequences, train.sequences)
  np.testing.assert_array_equal(valid2, valid)


def test_fortunes_lm_data_valid_fraction(tmp_path, monkeypatch):
  words = 'a small corpus of short english sentences for the validation split'.split()
  docs = [' '.join(words[i % 7:i % 7 + 5]) + f' {i}.' for i in range(200)]
  monkeypatch.setattr(corpus, 'fortunes_documents', lambda cache_dir=None: docs)
  kwargs = dict(seq_len=32, batch_size=4, vocab_size=300, seed=0, cache_dir=tmp_path)
  _, train, none = pipeline.fortunes_lm_data(**kwargs, valid_fraction=0.0)
  assert none.shape == (0, 33) and none.dtype == np.int32 and train.sequences.shape[1] == 33
  with pytest.raises(ValueError, match='valid_fraction=0.005.*raise valid_fraction or lower seq_len'):
    pipeline.fortunes_lm_data(**kwargs, valid_fraction=0.005)
