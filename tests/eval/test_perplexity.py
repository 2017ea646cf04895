"""Sliding-window perplexity against a window-by-window NumPy float64 loop, and the unigram baseline."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import eval as jeval
from jaxcompress import models

VOCAB = 61
# initializer_range 0.5: logits depend strongly on context, so a wrong window shows in the NLL.
LLAMA = models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                                        num_heads=2, num_kv_heads=1, initializer_range=0.5))


@pytest.fixture(scope='module')
def llama_params():
  return LLAMA.init(jax.random.key(0))


# Toy causal LMs whose logits NumPy computes too ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab_size: int


@dataclasses.dataclass(frozen=True)
class PrefixMean:
  """logits_t = mean(emb[x_0..x_t]) @ out, the mean taken inside the window: every token of context counts."""

  config: ToyConfig
  causal: ClassVar[bool] = True

  def max_positions(self):
    return None

  def apply(self, params, tokens, attention_mask=None):
    e = params['emb'][tokens]  # [B, T, D]
    prefix = jnp.cumsum(e, axis=1) / jnp.arange(1, tokens.shape[1] + 1)[:, None]
    return prefix @ params['out']  # [B, T, V]


def prefix_mean_logits(params, window: np.ndarray) -> np.ndarray:
  e = np.asarray(params['emb'], np.float64)[window]
  return (np.cumsum(e, axis=0) / np.arange(1, len(window) + 1)[:, None]) @ np.asarray(params['out'], np.float64)


@dataclasses.dataclass(frozen=True)
class Bigram:
  """logits_t = table[x_t]: only the previous token counts, so any windowing gives the closed form."""

  config: ToyConfig
  causal: ClassVar[bool] = True

  def max_positions(self):
    return None

  def apply(self, params, tokens, attention_mask=None):
    return params['table'][tokens]  # [B, T, V]


TOY = PrefixMean(ToyConfig(VOCAB))


@pytest.fixture(scope='module')
def toy_params():
  rng = np.random.RandomState(7)
  return {'emb': jnp.asarray(rng.normal(size=(VOCAB, 8)) * 2, jnp.float32),
          'out': jnp.asarray(rng.normal(size=(8, VOCAB)), jnp.float32)}


def _stream(n: int, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(0, VOCAB, (n,)).astype(np.int32)


def _log_softmax64(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_nll(window_logits, tokens: np.ndarray, max_length: int, stride: int) -> tuple[float, int]:
  """The Hugging Face loop: one window at a time, labels before its last `end - prev_end` positions ignored.

  window_logits: window [L] int -> logits [L, V].
  """
  n, total, count, prev_end = len(tokens), 0.0, 0, 0
  for begin in range(0, n, stride):
    end = min(begin + max_length, n)
    trg_len = end - prev_end
    window = tokens[begin:end]
    logp = _log_softmax64(window_logits(window))
    for j in range(len(window) - 1):  # logits at j predict window[j + 1]
      if j + 1 >= len(window) - trg_len:
        total -= logp[j, window[j + 1]]
        count += 1
    prev_end = end
    if end == n:
      break
  return total, count


@pytest.mark.parametrize('n, max_length, stride, batch_size', [
    (32, 8, 8, 2),   # disjoint windows, stream a multiple of the stride
    (37, 8, 8, 3),   # disjoint, short last window
    (37, 8, 3, 4),   # overlapping windows, stream not a multiple of the stride
    (37, 8, 5, 16),  # batch larger than the number of windows
    (20, 6, 1, 5),   # stride 1: every token gets the full context
    (9, 8, 8, 1),    # last window holds a single token and scores nothing
    (6, 8, 4, 2),    # stream shorter than one window
])
def test_matches_window_by_window_reference(toy_params, n, max_length, stride, batch_size):
  tokens = _stream(n, seed=n + stride)
  result = jeval.perplexity(TOY, toy_params, tokens, max_length=max_length, stride=stride, batch_size=batch_size)
  want_nll, want_count = reference_nll(lambda w: prefix_mean_logits(toy_params, w), tokens, max_length, stride)
  assert result.count == want_count
  np.testing.assert_allclose(result.nll, want_nll, rtol=1e-5)
  np.testing.assert_allclose(result.perplexity, math.exp(want_nll / want_count), rtol=1e-5)


def test_overlap_changes_the_answer(toy_params):
  # Guards the test above: the toy model is context-sensitive enough to tell the windowings apart.
  tokens = _stream(40, seed=1)
  disjoint = jeval.perplexity(TOY, toy_params, tokens, max_length=8)
  overlap = jeval.perplexity(TOY, toy_params, tokens, max_length=8, stride=2)
  assert disjoint.count == 40 - 5 and overlap.count == 40 - 1
  assert abs(disjoint.mean_nll - overlap.mean_nll) > 1e-2


@pytest.mark.parametrize('stride, batch_size', [(8, 2), (3, 4)])
def test_llama_matches_window_by_window_reference(llama_params, stride, batch_size):
  tokens = _stream(37, seed=stride)
  apply = jax.jit(LLAMA.apply)
  result = jeval.perplexity(LLAMA, llama_params, tokens, max_length=8, stride=stride, batch_size=batch_size)
  want_nll, want_count = reference_nll(lambda w: apply(llama_params, jnp.asarray(w[None]))[0], tokens, 8, stride)
  assert result.count == want_count
  np.testing.assert_allclose(result.nll, want_nll, rtol=1e-5)


def test_one_window_is_exp_mean_nll_of_the_forward_pass(llama_params):
  tokens = _stream(8, seed=2)
  logp = _log_softmax64(jax.jit(LLAMA.apply)(llama_params, jnp.asarray(tokens[None]))[0])
  nll = -logp[np.arange(7), tokens[1:]]
  result = jeval.perplexity(LLAMA, llama_params, jnp.asarray(tokens), max_length=32)
  assert result.count == 7
  np.testing.assert_allclose(result.perplexity, np.exp(nll.mean()), rtol=1e-5)
  np.testing.assert_allclose(result.bits_per_token, nll.mean() / np.log(2), rtol=1e-5)


@pytest.mark.parametrize('n, max_length, stride', [(50, 8, 3), (50, 8, 7), (17, 16, 5), (64, 8, 8), (65, 8, 8)])
def test_windows_score_each_target_at_most_once(n, max_length, stride):
  tokens = np.arange(n)
  inputs, targets, mask = jeval.windows(tokens, max_length, stride)
  assert inputs.shape == targets.shape == mask.shape == (inputs.shape[0], min(max_length, n))
  np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
  scored = np.sort(targets[mask])
  if stride < max_length:
    np.testing.assert_array_equal(scored, np.arange(1, n))
  else:  # disjoint: each window's first token has no context in its window
    np.testing.assert_array_equal(scored, np.setdiff1d(np.arange(1, n), np.arange(0, n, max_length)))


def _bigram_nll(table: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  return -_log_softmax64(table)[tokens[:-1], tokens[1:]]  # [N - 1]


def test_bigram_closed_form():
  rng = np.random.RandomState(3)
  table = rng.normal(size=(VOCAB, VOCAB)).astype(np.float32) * 3
  tokens = rng.randint(0, VOCAB, (45,))
  model = Bigram(ToyConfig(VOCAB))
  nll = _bigram_nll(table, tokens)
  overlap = jeval.perplexity(model, {'table': jnp.asarray(table)}, tokens, max_length=10, stride=4, batch_size=3)
  assert overlap.count == 44
  np.testing.assert_allclose(overlap.nll, nll.sum(), rtol=1e-5)
  disjoint = jeval.perplexity(model, {'table': jnp.asarray(table)}, tokens, max_length=10)
  unscored = np.arange(10, 45, 10)  # window starts: targets with no context in their window
  np.testing.assert_allclose(disjoint.nll, np.delete(nll, unscored - 1).sum(), rtol=1e-5)


def test_token_nll_matches_numpy():
  rng = np.random.RandomState(4)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 4
  targets = rng.randint(0, 7, (2, 5))
  mask = rng.rand(2, 5) > 0.3
  full = -np.take_along_axis(_log_softmax64(logits), targets[..., None], -1)[..., 0]
  got = jax.jit(jeval.token_nll)(logits, targets, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, full * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jeval.token_nll(logits, targets), full, rtol=1e-5)


def test_bf16_logits_are_scored_in_float32():
  logits = jnp.asarray([[[30.0, 0.0, -30.0]]], jnp.bfloat16)
  nll = jeval.token_nll(logits, jnp.asarray([[2]]), None)
  assert nll.dtype == jnp.float32
  np.testing.assert_allclose(nll, [[60.0]], rtol=1e-3)  # log-softmax in bf16 would round far off


# Unigram baseline ---------------------------------------------------------------------------------------------


def test_unigram_matches_counting():
  train = np.array([0, 1, 1, 2, 2, 2, 4])
  evals = np.array([2, 3, 1, 2])
  k, v = 0.5, 5
  counts = {t: list(train).count(t) for t in range(v)}
  want = -sum(math.log((counts[t] + k) / (len(train) + k * v)) for t in evals)
  result = jeval.unigram_perplexity(jnp.asarray(train), evals, v, smoothing=k)
  assert result.count == 4
  np.testing.assert_allclose(result.nll, want, rtol=1e-12)
  # Unsmoothed on its own training data is the maximum-likelihood unigram.
  mle = jeval.unigram_perplexity(train, train, v, smoothing=0.0)
  np.testing.assert_allclose(mle.nll, -sum(counts[t] * math.log(counts[t] / 7) for t in (0, 1, 2, 4)))
  # Heavy smoothing forgets the counts: uniform over the vocabulary.
  np.testing.assert_allclose(jeval.unigram_perplexity(train, evals, v, smoothing=1e9).perplexity, v, rtol=1e-6)


def test_context_model_beats_unigram():
  # A stream where the next token is usually the successor of the current one: the bigram model must win.
  rng = np.random.RandomState(5)
  steps = np.where(rng.rand(4000) < 0.9, 1, rng.randint(0, VOCAB, 4000))
  stream = np.cumsum(steps) % VOCAB
  train, evals = stream[:3000], stream[3000:]
  pairs = np.zeros((VOCAB, VOCAB))
  np.add.at(pairs, (train[:-1], train[1:]), 1.0)
  table = np.log(pairs + 0.1).astype(np.float32)
  lm = jeval.perplexity(Bigram(ToyConfig(VOCAB)), {'table': jnp.asarray(table)}, evals, max_length=64, stride=32)
  uni = jeval.unigram_perplexity(train, evals, VOCAB)
  assert uni.perplexity > 0.9 * VOCAB  # the stream's marginal is near uniform
  assert lm.perplexity < 3.0 < uni.perplexity


# Input checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('tokens, kwargs, match', [
    (_stream(20), dict(max_length=8, stride=9), r'stride=9 must be in \[1, max_length=8\].*stride=max_length'),
    (_stream(20), dict(max_length=8, stride=0), r'stride=0'),
    (_stream(20), dict(max_length=1), r'max_length=1.*at least 2 tokens'),
    (_stream(1), dict(max_length=8), r'tokens has 1 tokens; at least 2'),
    (_stream(20).astype(np.float32), dict(max_length=8), r'tokens has dtype float32; ids must be integers.*not cast'),
    (_stream(20).reshape(4, 5), dict(max_length=8), r'1-D token stream \[N\], got shape \(4, 5\).*reshape'),
    (np.array([3, VOCAB, 4]), dict(max_length=8), rf'tokens: 1 id is outside \[0, {VOCAB}\) \(vocab_size={VOCAB}\), e\.g\. {VOCAB} at \[position\] \[1\]'),
    (np.array([3, -1, 4]), dict(max_length=8), r'outside .*e\.g\. -1 at'),
    (_stream(20), dict(max_length=8, batch_size=0), r'batch_size=0'),
])
def test_bad_inputs(toy_params, tokens, kwargs, match):
  with pytest.raises(ValueError, match=match):
    jeval.perplexity(TOY, toy_params, tokens, **kwargs)


def test_rejects_encoders_and_windows_past_learned_positions():
  bert = models.Bert(models.BertConfig(vocab_size=VOCAB, hidden_size=8, num_layers=1, num_heads=2,
                                       intermediate_size=8))
  with pytest.raises(ValueError, match='needs a causal LM; Bert is an encoder'):
    jeval.perplexity(bert, {}, _stream(20), max_length=8)
  gpt2 = models.GPT2(models.GPT2Config(vocab_size=VOCAB, n_positions=16, hidden_size=8, num_layers=1,
                                       num_heads=2))
  with pytest.raises(ValueError, match='max_length=32 exceeds the 16 learned positions'):
    jeval.perplexity(gpt2, {}, _stream(40), max_length=32)


def test_unigram_bad_inputs():
  with pytest.raises(ValueError, match=r'eval token 3 never occurs in train_tokens.*smoothing > 0'):
    jeval.unigram_perplexity(np.array([0, 1]), np.array([0, 3]), 5, smoothing=0.0)
  with pytest.raises(ValueError, match=r'smoothing=-1.0'):
    jeval.unigram_perplexity(np.array([0, 1]), np.array([0, 1]), 5, smoothing=-1.0)
  with pytest.raises(ValueError, match=r'eval_tokens: 1 id is outside \[0, 5\) \(vocab_size=5\), e\.g\. 5 at'):
    jeval.unigram_perplexity(np.array([0, 1]), np.array([5]), 5)
