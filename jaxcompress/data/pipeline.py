"""Token streams packed into fixed-length rows, and causal-LM batches drawn from them by step number.

    tok, train, valid = fortunes_lm_data(seq_len=256, batch_size=32, vocab_size=4096, seed=0)
    batch = train.batch(step, process_index=jax.process_index(), process_count=jax.process_count())
    # batch: inputs [b, T] int32, targets [b, T] int32, mask [b, T] float32 (the format of train.objectives)

Packing: documents are concatenated, each followed by EOS, and cut into rows of seq_len + 1 tokens, where row i
covers stream tokens [i * seq_len, i * seq_len + seq_len + 1). Consecutive rows share one token (the last
target of row i is the first input of row i + 1), so every token but the very first is a target exactly once.

Batches are a pure function of (seed, step): the global batch of step s is rows [s * B, (s + 1) * B) of the
endless sequence "epoch 0 shuffled, epoch 1 shuffled, ...", each epoch a permutation of all N rows drawn from
jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ORDER_STREAM), epoch). A batch may straddle two
epochs. Resuming at step s therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
import tokenizers

from jaxcompress import provenance
from jaxcompress.data import corpus
from jaxcompress.data import tokenizer as tokenizer_lib

ORDER_STREAM = 1  # epoch orders draw from fold_in(key(seed), ORDER_STREAM); see corpus.SPLIT_STREAM
PACK_FORMAT = 'pack/1'  # part of every cache key: change it when packing changes
MAX_EPOCH = 2**32 - 1  # jax.random.fold_in takes a uint32
CACHE_EPOCH_PERMUTATIONS = 4  # a batch touches at most two epochs; keep a few for interleaved readers


def pack(token_docs: Iterable[np.ndarray], *, seq_len: int, eos_id: int) -> np.ndarray:
  """Documents of token ids ([len_i] int) -> rows [N, seq_len + 1] int32, each document followed by eos_id.

  Row i is stream[i * seq_len : i * seq_len + seq_len + 1]: rows overlap by one token, so that inputs
  row[:-1] and targets row[1:] make every stream token after the first a target exactly once. The tokens
  after the last full row are dropped.
  """
  seq_len = operator.index(seq_len)
  eos_id = operator.index(eos_id)
  if seq_len < 1:
    raise ValueError(f'pack: seq_len={seq_len} must be at least 1.')
  if not 0 <= eos_id < 2**31:
    raise ValueError(f'pack: eos_id={eos_id} must be a token id in [0, 2**31); pass the tokenizer\'s EOS id.')
  eos = np.asarray([eos_id], np.int32)
  pieces = []
  for i, doc in enumerate(token_docs):
    doc = np.asarray(doc)
    if doc.ndim != 1 or (doc.size and not np.issubdtype(doc.dtype, np.integer)):
      raise ValueError(f'pack: document {i} has shape {doc.shape} and dtype {doc.dtype}; each document must '
                       'be a 1-D array of integer token ids.')
    if doc.size and (doc.min() < 0 or doc.max() >= 2**31):
      raise ValueError(f'pack: document {i} holds ids in [{doc.min()}, {doc.max()}]; token ids must lie in '
                       '[0, 2**31).')
    pieces += [doc.astype(np.int32), eos]
  stream = np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)
  rows = (stream.size - 1) // seq_len
  if rows < 1:
    raise ValueError(f'pack: the documents hold {stream.size} tokens with their EOS tokens, fewer than the '
                     f'seq_len + 1 = {seq_len + 1} one row needs; give more text or a smaller seq_len.')
  windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)
  return np.ascontiguousarray(windows[::seq_len][:rows])


@functools.lru_cache(maxsize=CACHE_EPOCH_PERMUTATIONS)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n rows in `epoch`: [n] int64, a permutation computed on the host CPU (read-only)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), ORDER_STREAM), epoch)
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    perm = np.asarray(jax.random.permutation(key, n), np.int64)
  perm.flags.writeable = False
  return perm


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LMBatches:
  """Causal-LM batches by step number from packed rows; stateless, so any step can be read at any time."""

  sequences: np.ndarray  # [N, seq_len + 1] integer token rows, as `pack` returns
  batch_size: int  # global batch size B: rows per step summed over all processes
  seed: int  # picks each epoch's shuffle (see the module docstring)

  def __post_init__(self):
    s = self.sequences
    if not isinstance(s, np.ndarray) or s.ndim != 2 or not np.issubdtype(s.dtype, np.integer):
      desc = f'{s.shape} {s.dtype}' if isinstance(s, np.ndarray) else type(s).__name__
      raise ValueError(f'LMBatches: sequences is {desc}; pass a 2-D integer np.ndarray [N, seq_len + 1] '
                       'from pack().')
    if s.shape[1] < 2:
      raise ValueError(f'LMBatches: sequences has rows of {s.shape[1]} tokens; rows need seq_len + 1 >= 2 tokens.')
    info = np.iinfo(s.dtype)
    if s.size and (info.min < -2**31 or info.max >= 2**31):  # batch() casts to int32: a wider id would wrap
      lo, hi = int(s.min()), int(s.max())
      if lo < -2**31 or hi >= 2**31:
        raise ValueError(f'LMBatches: sequences ({s.dtype}) hold ids in [{lo}, {hi}], past int32, which batch() '
                         "gives; token ids must lie in [0, 2**31) (and below the model's vocab_size).")
    b = self.batch_size
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool) or not 1 <= b <= s.shape[0]:
      raise ValueError(f'LMBatches: batch_size={self.batch_size} must lie in [1, {s.shape[0]}] (the number of '
                       'sequences); use a smaller batch_size or more data.')
    if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
      raise ValueError(f'LMBatches: seed={self.seed!r} must be an int; pass the run\'s integer seed.')

  @property
  def num_sequences(self) -> int:
    return self.sequences.shape[0]

  @property
  def seq_len(self) -> int:
    """T: tokens per row of inputs (and of targets)."""
    return self.sequences.shape[1] - 1

  @property
  def steps_per_epoch(self) -> int:
    """N // B: whole steps per pass over the rows (batches wrap, so epochs need not start on a step)."""
    return self.num_sequences // self.batch_size

  @property
  def tokens_per_batch(self) -> int:
    """Target tokens in one global batch: B * T."""
    return self.batch_size * self.seq_len

  def epoch(self, step: int) -> float:
    """Passes over the data completed before `step`."""
    return step * self.batch_size / self.num_sequences

  def rows(self, step: int, *, process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Indices into `sequences` of this process's rows of the global batch of `step`: [B / P] int64.

    Process p gets rows [p * B / P, (p + 1) * B / P) of the global batch.
    """
    step, p, count = operator.index(step), operator.index(process_index), operator.index(process_count)
    if step < 0:
      raise ValueError(f'LMBatches: step={step} must be >= 0.')
    if count < 1 or self.batch_size % count:
      raise ValueError(f'LMBatches: batch_size={self.batch_size} does not divide over process_count={count}; '
                       'make the global batch size a multiple of the process count.')
    if not 0 <= p < count:
      raise ValueError(f'LMBatches: process_index={p} must lie in [0, {count}) for process_count={count}.')
    local = self.batch_size // count
    n = self.num_sequences
    positions = step * self.batch_size + p * local + np.arange(local, dtype=np.int64)
    epochs, offsets = np.divmod(positions, n)
    if int(epochs[-1]) > MAX_EPOCH:
      raise ValueError(f'LMBatches: step={step} reaches epoch {int(epochs[-1])}, past the last one ({MAX_EPOCH}).')
    out = np.empty(local, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = epoch_permutation(int(self.seed), int(e), n)[offsets[sel]]
    return out

  def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's share of the global batch of `step` (b = B / P rows, T = seq_len).

    Returns inputs [b, T] int32, targets [b, T] int32 (inputs shifted by one) and mask [b, T] float32 (ones).
    """
    seq = self.sequences[self.rows(step, process_index=process_index, process_count=process_count)]
    seq = seq.astype(np.int32, copy=False)
    inputs, targets = np.ascontiguousarray(seq[:, :-1]), np.ascontiguousarray(seq[:, 1:])
    return {'inputs': inputs, 'targets': targets, 'mask': np.ones(targets.shape, np.float32)}

  def fingerprint(self) -> str:
    """What a resumed run must see again: a hash of every token row (the tokenizer and the split show in the
    ids), the shuffle seed and the batch size. Computed once per object (a pass over the rows)."""
    cached = self.__dict__.get('_fingerprint')
    if cached is None:
      rows = np.ascontiguousarray(self.sequences)
      cached = cache_key([PACK_FORMAT, str(rows.dtype), *rows.shape, rows.tobytes(), int(self.seed),
                          int(self.batch_size)])[:16]
      object.__setattr__(self, '_fingerprint', cached)
    return cached


KeyPart = str | bytes | int | float


def cache_key(key_parts: Iterable[KeyPart]) -> str:
  """sha256 hex digest of typed, length-prefixed parts: ('ab', 'c') and ('a', 'bc') differ."""
  h = hashlib.sha256()
  for part in key_parts:
    if isinstance(part, str):
      tag, data = b's', part.encode('utf-8')
    elif isinstance(part, bytes):
      tag, data = b'b', part
    elif isinstance(part, (bool, int, float, np.integer, np.floating)):
      tag, data = b'n', repr(part.item() if isinstance(part, np.generic) else part).encode()
    else:
      raise TypeError(f'cache_key: key part of type {type(part).__name__} cannot be hashed stably; use str, '
                      'bytes, int or float (e.g. a digest of the object).')
    h.update(tag + len(data).to_bytes(8, 'little') + data)
  return h.hexdigest()


def token_cache(key_parts: Iterable[KeyPart], build_fn: Callable[[], np.ndarray],
                cache_dir: str | os.PathLike) -> np.ndarray:
  """build_fn()'s array, stored once as <cache_dir>/<sha256 of key_parts>.npy and loaded on later calls.

  Put into key_parts everything the array depends on (e.g. the corpus text, the tokenizer's JSON, seq_len).
  Writes are atomic, so concurrent builders at worst both build; an unreadable file is rebuilt.
  """
  path = Path(cache_dir) / f'{cache_key(key_parts)}.npy'
  if path.is_file():
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
      pass  # truncated or foreign file: rebuild over it
  array = build_fn()
  if not isinstance(array, np.ndarray) or array.dtype == object:
    raise TypeError(f'token_cache: build_fn returned {type(array).__name__}'
                    f'{" of dtype object" if isinstance(array, np.ndarray) else ""}; it must return a numeric '
                    'np.ndarray.')
  provenance.atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))
  return array


def cached_bpe(texts: Sequence[str], *, vocab_size: int, cache_dir: str | os.PathLike,
               special_tokens: Sequence[str] = (tokenizer_lib.EOS,)) -> tokenizers.Tokenizer:
  """train_bpe(texts, ...), stored as <cache_dir>/<sha256 of its inputs>.json and loaded on later calls."""
  key = cache_key(['bpe', tokenizers.__version__, vocab_size, len(special_tokens), *special_tokens,
                   len(texts), *texts])
  path = Path(cache_dir) / f'{key}.json'
  if path.is_file():
    try:
      return tokenizers.Tokenizer.from_file(str(path))
    except Exception:  # truncated or foreign file: retrain over it
      pass
  tok = tokenizer_lib.train_bpe(texts, vocab_size=vocab_size, special_tokens=special_tokens)
  provenance.atomic_write(path, lambda f: f.write(tok.to_str().encode('utf-8')))
  return tok


def packed_documents(tok: tokenizers.Tokenizer, docs: Sequence[str], *, seq_len: int,
                     cache_dir: str | os.PathLike, eos_token: str = tokenizer_lib.EOS) -> np.ndarray:
  """pack(encode_documents(tok, docs)) with EOS = eos_token, cached under cache_dir: [N, seq_len + 1] int32."""
  eos_id = tokenizer_lib.token_id(tok, eos_token)
  parts = [PACK_FORMAT, tok.to_str(), eos_id, seq_len, len(docs), *docs]
  return token_cache(parts, lambda: pack(tokenizer_lib.encode_documents(tok, docs), seq_len=seq_len,
                                         eos_id=eos_id), cache_dir)


def fortunes_lm_data(*, seq_len: int, batch_size: int, vocab_size: int, seed: int, valid_fraction: float = 0.05,
                     cache_dir: str | os.PathLike | None = None,
                     ) -> tuple[tokenizers.Tokenizer, LMBatches, np.ndarray]:
  """The fortunes corpus as causal-LM data: (tokenizer, train batches, valid rows [N_valid, seq_len + 1] int32).

  Documents are split by `seed`; the BPE tokenizer is trained on the train documents only; both splits are
  packed with EOS between documents. The corpus, tokenizer and packed rows are cached under cache_dir (default
  corpus.default_cache_dir()), so later calls take well under a second. valid_fraction=0 gives no valid rows.
  """
  cache = Path(cache_dir).expanduser() if cache_dir is not None else corpus.default_cache_dir()
  docs = corpus.fortunes_documents(cache)
  train_docs, valid_docs = corpus.split_documents(docs, valid_fraction=valid_fraction, seed=seed)
  tok = cached_bpe(train_docs, vocab_size=vocab_size, cache_dir=cache / 'tokenizers')
  train = packed_documents(tok, train_docs, seq_len=seq_len, cache_dir=cache / 'tokens')
  if valid_docs:
    try:
      valid = packed_documents(tok, valid_docs, seq_len=seq_len, cache_dir=cache / 'tokens')
    except ValueError as e:
      raise ValueError(f'fortunes_lm_data: the validation split (valid_fraction={valid_fraction}) is too short '
                       f'for one row of seq_len={seq_len}; raise valid_fraction or lower seq_len. ({e})') from e
  else:
    valid = np.zeros((0, seq_len + 1), np.int32)
  return tok, LMBatches(sequences=train, batch_size=batch_size, seed=seed), valid
