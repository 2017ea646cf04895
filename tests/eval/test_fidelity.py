"""Fidelity metrics against NumPy float64 written from their definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import eval as jeval
from jaxcompress import models

VOCAB = 29
LLAMA = models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                                        num_heads=2, num_kv_heads=1, initializer_range=0.3))


def _log_softmax64(logits) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def kl_reference(ref_logits, logits, mask=None) -> float:
  """mean over selected tokens of sum_v p_ref (log p_ref - log p), skipping classes with p_ref = 0."""
  lr, lp = _log_softmax64(ref_logits), _log_softmax64(logits)
  pr = np.exp(lr)
  per_token = (pr * np.where(pr > 0, lr - lp, 0.0)).sum(-1)
  m = np.ones(per_token.shape, bool) if mask is None else np.asarray(mask, bool)
  return float(per_token[m].mean())


def _pair(seed: int, shape=(3, 6, VOCAB), scale: float = 3.0):
  rng = np.random.RandomState(seed)
  ref = rng.normal(size=shape) * scale
  return ref.astype(np.float32), (ref + rng.normal(size=shape)).astype(np.float32), rng.rand(*shape[:-1]) > 0.4


def test_identical_logits_give_zero_kl_and_full_agreement():
  ref, _, mask = _pair(0)
  assert abs(float(jeval.logit_kl(ref, ref))) < 1e-6
  assert float(jeval.logit_kl(ref, ref, mask)) == pytest.approx(0.0, abs=1e-6)
  assert float(jeval.top1_agreement(ref, ref, mask)) == 1.0
  assert float(jeval.relative_error(ref, ref)) == 0.0


def test_kl_matches_numpy():
  ref, other, mask = _pair(1)
  got = jeval.logit_kl(ref, other, mask)
  assert got.dtype == jnp.float32 and got.shape == ()
  want = kl_reference(ref, other, mask)
  assert want > 0.05
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(jeval.logit_kl(ref, other), kl_reference(ref, other), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(jeval.logit_kl)(ref, other, mask), want, rtol=1e-5)
  # KL is not symmetric; the reference distribution is the first argument.
  np.testing.assert_allclose(jeval.logit_kl(other, ref, mask), kl_reference(other, ref, mask), rtol=1e-5)


def test_kl_with_classes_the_reference_rules_out():
  ref, other, _ = _pair(2)
  ref[..., :5] = -np.inf  # e.g. padded vocabulary entries
  got = jeval.logit_kl(ref, other)
  assert np.isfinite(float(got))
  np.testing.assert_allclose(got, kl_reference(ref, other), rtol=1e-5)


def test_kl_of_bf16_logits_is_float32():
  ref, other, _ = _pair(3)
  got = jeval.logit_kl(jnp.asarray(ref, jnp.bfloat16), jnp.asarray(other, jnp.bfloat16))
  assert got.dtype == jnp.float32
  want = kl_reference(np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float64),
                      np.asarray(jnp.asarray(other, jnp.bfloat16), np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_top1_agreement_matches_numpy():
  ref, other, mask = _pair(4)
  same = np.argmax(ref, -1) == np.argmax(other, -1)
  assert 0 < same[mask].mean() < 1
  np.testing.assert_allclose(jeval.top1_agreement(ref, other, mask), same[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jeval.top1_agreement)(ref, other), same.mean(), rtol=1e-6)


def test_relative_error_matches_numpy():
  ref, other, mask = _pair(5)
  r, o = ref.astype(np.float64), other.astype(np.float64)
  np.testing.assert_allclose(jeval.relative_error(ref, other), np.linalg.norm(o - r) / np.linalg.norm(r),
                             rtol=1e-5)
  np.testing.assert_allclose(jeval.relative_error(ref, other, mask),
                             np.linalg.norm((o - r)[mask]) / np.linalg.norm(r[mask]), rtol=1e-5)


def test_no_selected_tokens_give_zero():
  ref, other, _ = _pair(6)
  none = np.zeros(ref.shape[:-1], bool)
  assert float(jeval.logit_kl(ref, other, none)) == 0.0
  assert float(jeval.top1_agreement(ref, other, none)) == 0.0


def test_embedding_cosine():
  rng = np.random.RandomState(7)
  a = rng.normal(size=(5, 12)).astype(np.float32)
  b = (a + 0.5 * rng.normal(size=a.shape)).astype(np.float32)
  same = jeval.embedding_cosine(a, a)
  np.testing.assert_allclose(same.per_row, np.ones(5), atol=1e-6)
  assert float(same.mean) == pytest.approx(1.0, abs=1e-6) and float(same.min) == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(jeval.embedding_cosine(a, 3.0 * a).per_row, np.ones(5), atol=1e-6)
  np.testing.assert_allclose(jeval.embedding_cosine(a, -a).per_row, -np.ones(5), atol=1e-6)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  want = (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))
  got = jax.jit(jeval.embedding_cosine)(a, b)
  np.testing.assert_allclose(got.per_row, want, rtol=1e-5)
  np.testing.assert_allclose(got.mean, want.mean(), rtol=1e-5)
  np.testing.assert_allclose(got.min, want.min(), rtol=1e-5)
  assert float(jeval.embedding_cosine(np.zeros((2, 3)), np.ones((2, 3))).min) == 0.0  # zero rows: no NaN


def test_shape_errors():
  ref, other, mask = _pair(8)
  with pytest.raises(ValueError, match=r'logit_kl: reference shape \(3, 6, 29\) and compared shape '
                                       r'\(3, 6, 28\) differ.*same tokens'):
    jeval.logit_kl(ref, other[..., :-1])
  with pytest.raises(ValueError, match=r'mask shape \(3, 5\) must equal the token shape \(3, 6\)'):
    jeval.top1_agreement(ref, other, mask[:, :-1])
  with pytest.raises(ValueError, match=r'embedding_cosine'):
    jeval.embedding_cosine(ref[0], other[1, :-1])


# Whole models -------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def llama_params():
  return LLAMA.init(jax.random.key(0))


def _perturbed(params, scale: float, seed: int = 1):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def test_compare_lm(llama_params):
  tokens = jnp.asarray(np.random.RandomState(9).randint(0, VOCAB, (2, 7)), jnp.int32)
  attention_mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2])
  same = jeval.compare_lm(LLAMA, llama_params, LLAMA, llama_params, tokens, attention_mask=attention_mask)
  assert set(same) == {'kl', 'top1', 'rel_logit_error'}
  assert abs(float(same['kl'])) < 1e-6 and float(same['top1']) == 1.0 and float(same['rel_logit_error']) == 0.0

  noisy = _perturbed(llama_params, 0.05)
  got = jeval.compare_lm(LLAMA, llama_params, LLAMA, noisy, tokens, attention_mask=attention_mask)
  apply = jax.jit(LLAMA.apply)
  ref = np.asarray(apply(llama_params, tokens, attention_mask=attention_mask), np.float64)
  out = np.asarray(apply(noisy, tokens, attention_mask=attention_mask), np.float64)
  m = np.asarray(attention_mask, bool)
  np.testing.assert_allclose(got['kl'], kl_reference(ref, out, m), rtol=1e-4)
  assert float(got['kl']) > 0
  np.testing.assert_allclose(got['top1'], (ref.argmax(-1) == out.argmax(-1))[m].mean(), rtol=1e-6)
  np.testing.assert_allclose(got['rel_logit_error'], np.linalg.norm((out - ref)[m]) / np.linalg.norm(ref[m]),
                             rtol=1e-4)


def test_sentence_embedding_cosine():
  bert = models.Bert(models.BertConfig(vocab_size=VOCAB, hidden_size=16, num_layers=1, num_heads=2,
                                       intermediate_size=32, max_position_embeddings=16))
  params = bert.init(jax.random.key(2))
  tokens = jnp.asarray(np.random.RandomState(10).randint(0, VOCAB, (3, 6)), jnp.int32)
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
  embed = jax.jit(bert.sentence_embedding)
  ref = embed(params, tokens, mask)
  assert float(jeval.embedding_cosine(ref, embed(params, tokens, mask)).min) == pytest.approx(1.0, abs=1e-6)
  cos = jeval.embedding_cosine(ref, embed(_perturbed(params, 0.2), tokens, mask))
  r, e = np.asarray(ref, np.float64), np.asarray(embed(_perturbed(params, 0.2), tokens, mask), np.float64)
  want = (r * e).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(e, axis=-1))
  np.testing.assert_allclose(cos.per_row, want, rtol=1e-5)
  assert float(cos.min) < 0.999
