"""Perplexity of a causal LM over a long token stream, with strided sliding windows.

A stream longer than the model's context is cut into windows of `max_length` tokens that start every
`stride` tokens, the last one ending at the end of the stream. Each window scores only the targets that no
earlier window scored:

    PPL = exp( -(1 / |S|) * sum_{i in S} log p(x_i | x_{b(i)} .. x_{i-1}) )

where b(i) is the start of the first window that ends past i and S the targets with b(i) < i. With
stride < max_length, S is every token but the first, each seen with at least max_length - stride tokens of
context. With stride == max_length (disjoint windows, the cheapest and most pessimistic setting) the first
token of each window has no context inside its window and is not scored. This is the procedure of the
Hugging Face guide "Perplexity of fixed-length models", so the numbers compare directly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.models import ids
from jaxcompress.models.base import Model, Params


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Summed negative log-likelihood (nats) over `count` scored tokens."""

  nll: float  # total NLL in nats
  count: int  # number of tokens scored

  @property
  def mean_nll(self) -> float:
    """Cross-entropy in nats per token."""
    return self.nll / self.count

  @property
  def perplexity(self) -> float:
    return math.exp(self.mean_nll)

  @property
  def bits_per_token(self) -> float:
    return self.mean_nll / math.log(2.0)


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Per-token negative log-likelihood, with the log-softmax in float32.

  logits: [..., T, V] any float dtype; targets: [..., T] int; mask: [..., T] bool or {0, 1} (None: all)
  -> [..., T] float32, zero where mask is 0. The one token cross-entropy of the package (training uses it too).
  """
  nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                               targets.astype(jnp.int32))
  if mask is None:
    return nll
  return jnp.where(mask.astype(bool), nll, 0.0)


def window_starts(num_tokens: int, max_length: int, stride: int) -> np.ndarray:
  """Start offsets of the windows over a stream of `num_tokens`: 0, stride, ... until one reaches the end."""
  if num_tokens <= max_length:
    return np.zeros((1,), np.int64)
  return np.arange(0, num_tokens - max_length + stride, stride, dtype=np.int64)


def windows(tokens: np.ndarray, max_length: int, stride: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts a stream into equal-length windows, padding the last one on the right.

  tokens: [N] int -> (inputs [W, L] int32, targets [W, L] int32, mask [W, L] bool) with
  L = min(max_length, N). Position j of window w predicts targets[w, j] = tokens[start_w + j + 1]; mask is
  True where that target is scored here and by no earlier window. Right padding is exact for a causal
  model: no real position attends to it.
  """
  n = tokens.shape[0]
  length = min(max_length, n)
  starts = window_starts(n, max_length, stride)
  ends = np.minimum(starts + max_length, n)
  first_new = np.concatenate([[1], ends[:-1]])  # first target index this window scores
  padded = np.concatenate([tokens, np.zeros((length + 1,), tokens.dtype)])
  idx = starts[:, None] + np.arange(length + 1)[None, :]  # [W, L + 1]
  chunk = padded[idx].astype(np.int32)
  target_pos = idx[:, 1:]
  mask = (target_pos >= first_new[:, None]) & (target_pos < ends[:, None])
  return chunk[:, :-1], chunk[:, 1:], mask


def sequence_nll(model: Model, params: Params, inputs: jax.Array, targets: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """The one scoring path of every perplexity here and in training's held-out evaluation (traceable: jit it,
  shard its inputs over a mesh, or both).

  inputs, targets: [B, L] int; mask: [B, L] bool or {0, 1} -> (summed NLL per row [B] float32, scored tokens
  per row [B] int32).
  """
  nll = token_nll(model.apply(params, inputs), targets, mask)
  return nll.sum(axis=-1), mask.astype(bool).sum(axis=-1).astype(jnp.int32)


_windows_nll = jax.jit(sequence_nll, static_argnums=0)


def _batches(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray, batch_size: int
             ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Fixed-size batches of windows; the last is filled with fully masked windows so one compile serves all."""
  w = inputs.shape[0]
  for lo in range(0, w, batch_size):
    hi = min(lo + batch_size, w)
    fill = batch_size - (hi - lo)
    pad = lambda x: np.concatenate([x[lo:hi], np.zeros((fill,) + x.shape[1:], x.dtype)]) if fill else x[lo:hi]
    yield pad(inputs), pad(targets), pad(mask)


def perplexity(model: Model, params: Params, tokens: np.ndarray | jax.Array, *, max_length: int,
               stride: int | None = None, batch_size: int = 8) -> PerplexityResult:
  """Strided sliding-window perplexity of a causal LM on one token stream.

  tokens: [N] int, N >= 2. max_length: window length (the context the model sees). stride: how far each
  window moves (default max_length: disjoint windows). batch_size: windows per forward pass.
  The first token is never scored: count is N - 1 when stride < max_length, N - (number of windows) when the
  windows are disjoint.
  """
  tokens = _check_stream(model, tokens, max_length, stride, batch_size)
  stride = max_length if stride is None else stride
  inputs, targets, mask = windows(tokens, max_length, stride)
  return _score(model, params, inputs, targets, mask, batch_size)


def _score(model: Model, params: Params, inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray,
           batch_size: int) -> PerplexityResult:
  """Summed NLL and scored tokens of [N, L] windows, in fixed-size batches (one compile)."""
  batch = min(batch_size, inputs.shape[0])
  # Dispatch every batch before reading any result back, so host and device overlap.
  per_batch = [_windows_nll(model, params, x, y, m) for x, y, m in _batches(inputs, targets, mask, batch)]
  nll, count = (np.concatenate(parts) for parts in zip(*jax.device_get(per_batch)))
  return PerplexityResult(nll=float(np.sum(nll, dtype=np.float64)), count=int(np.sum(count)))


def rows_perplexity(model: Model, params: Params, rows: np.ndarray | jax.Array, *, batch_size: int = 16
                    ) -> PerplexityResult:
  """Perplexity over every next-token of packed rows [N, T + 1] (inputs [:, :-1], targets [:, 1:]): the held-out
  score of a model trained on such rows."""
  rows = np.asarray(jax.device_get(rows))
  if rows.ndim != 2 or rows.shape[1] < 2 or not len(rows):
    raise ValueError(f'rows_perplexity: rows must be [N >= 1, T + 1 >= 2] token ids, got shape {rows.shape}.')
  ids.check_tokens(model, rows, name='rows', where='rows_perplexity: ')  # under jit an invalid id scores NaN
  return _score(model, params, rows[:, :-1], rows[:, 1:], np.ones(rows[:, 1:].shape, bool), batch_size)


def unigram_perplexity(train_tokens: np.ndarray | jax.Array, eval_tokens: np.ndarray | jax.Array,
                       vocab_size: int, smoothing: float = 1.0) -> PerplexityResult:
  """The context-free baseline: add-k smoothed unigram frequencies from `train_tokens`, scored on every
  token of `eval_tokens`.

      p(v) = (count_train(v) + k) / (N_train + k * V)

  A language model that does not beat this has learned nothing beyond token frequencies.
  train_tokens, eval_tokens: [N] int in [0, vocab_size). smoothing: k >= 0.
  """
  if vocab_size < 1:
    raise ValueError(f'unigram_perplexity: vocab_size={vocab_size}; it must be at least 1.')
  if not smoothing >= 0:
    raise ValueError(f'unigram_perplexity: smoothing={smoothing}; use k >= 0 (1.0 is Laplace smoothing).')
  train = _check_ids('train_tokens', train_tokens, vocab_size, min_len=0 if smoothing > 0 else 1)
  evals = _check_ids('eval_tokens', eval_tokens, vocab_size, min_len=1)
  counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
  with np.errstate(divide='ignore'):  # unseen tokens without smoothing: log 0 = -inf, reported below
    logp = np.log(counts + smoothing) - np.log(train.shape[0] + smoothing * vocab_size)
  scored = logp[evals]
  if not np.all(np.isfinite(scored)):
    unseen = int(evals[~np.isfinite(scored)][0])
    raise ValueError(f'unigram_perplexity: eval token {unseen} never occurs in train_tokens, so with '
                     f'smoothing={smoothing} its probability is 0; use smoothing > 0.')
  return PerplexityResult(nll=float(-scored.sum()), count=int(evals.shape[0]))


# Input checks -----------------------------------------------------------------------------------------------


def _check_ids(name: str, tokens, vocab_size: int, *, min_len: int) -> np.ndarray:
  """A 1-D integer stream with every id in [0, vocab_size), as a host int64 array."""
  arr = np.asarray(jax.device_get(tokens))
  if arr.ndim != 1:
    raise ValueError(f'{name} must be a 1-D token stream [N], got shape {arr.shape}; '
                     'concatenate documents (with a separator token) or pass tokens.reshape(-1).')
  ids.check_integer(arr, name=name)
  if arr.shape[0] < min_len:
    raise ValueError(f'{name} has {arr.shape[0]} tokens; at least {min_len} are needed.')
  ids.check_ids(arr, vocab_size, name=name)
  return arr.astype(np.int64)


def _check_stream(model: Model, tokens, max_length: int, stride: int | None, batch_size: int) -> np.ndarray:
  if not getattr(model, 'causal', False):
    raise ValueError(f'perplexity needs a causal LM; {type(model).__name__} is an encoder '
                     '(use a masked-LM pseudo-perplexity instead).')
  if max_length < 2:
    raise ValueError(f'perplexity: max_length={max_length}; a window needs at least 2 tokens '
                     '(one to condition on, one to score). Use the model context length, e.g. 1024.')
  if stride is not None and not 1 <= stride <= max_length:
    raise ValueError(f'perplexity: stride={stride} must be in [1, max_length={max_length}]; a larger stride '
                     'would skip tokens. Use stride=max_length for disjoint windows or e.g. max_length // 2.')
  if batch_size < 1:
    raise ValueError(f'perplexity: batch_size={batch_size}; use at least 1.')
  limit = model.max_positions()  # learned position tables cannot extrapolate
  if limit is not None and max_length > limit:
    raise ValueError(f'perplexity: max_length={max_length} exceeds the {limit} learned positions of this '
                     f'model; use max_length <= {limit}.')
  stream = _check_ids('tokens', tokens, model.config.vocab_size, min_len=2)
  return stream
