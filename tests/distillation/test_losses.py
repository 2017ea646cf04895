"""Distillation losses against NumPy float64 references, with gradients checked numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxcompress.distillation import losses

RNG = np.random.RandomState(0)
T_LOGITS = RNG.randn(2, 3, 7).astype(np.float32) * 2
S_LOGITS = RNG.randn(2, 3, 7).astype(np.float32) * 2


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl(log_p, log_q):
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _grads(fn, *args):
  with jax.enable_x64(True):
    check_grads(fn, tuple(jnp.asarray(a, jnp.float64) for a in args), order=1, modes=('rev',), atol=1e-2,
                rtol=1e-2)


@pytest.mark.parametrize('temperature', [1.0, 2.5])
def test_soft_and_reverse_kl(temperature):
  t, s = _log_softmax(T_LOGITS / temperature), _log_softmax(S_LOGITS / temperature)
  np.testing.assert_allclose(losses.soft_kl(T_LOGITS, S_LOGITS, temperature), temperature ** 2 * _kl(t, s),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(losses.reverse_kl(T_LOGITS, S_LOGITS, temperature), temperature ** 2 * _kl(s, t),
                             rtol=1e-4, atol=1e-6)
  _grads(lambda x: losses.soft_kl(T_LOGITS, x, temperature).sum(), S_LOGITS)
  _grads(lambda x: losses.reverse_kl(T_LOGITS, x, temperature).sum(), S_LOGITS)


@pytest.mark.parametrize('beta', [0.1, 0.5, 0.9])
def test_generalized_jsd(beta):
  t, s = _log_softmax(T_LOGITS / 2), _log_softmax(S_LOGITS / 2)
  m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
  ref = 4 * (beta * _kl(t, m) + (1 - beta) * _kl(s, m))
  np.testing.assert_allclose(losses.generalized_jsd(T_LOGITS, S_LOGITS, beta, 2.0), ref, rtol=1e-4, atol=1e-6)
  assert np.all(ref >= 0) and np.allclose(losses.generalized_jsd(T_LOGITS, T_LOGITS, beta), 0, atol=1e-6)
  _grads(lambda x: losses.generalized_jsd(T_LOGITS, x, beta, 2.0).sum(), S_LOGITS)


def test_hidden_mse_through_projection():
  hs, ht, w = RNG.randn(2, 3, 4), RNG.randn(2, 3, 6), RNG.randn(4, 6)
  ref = ((hs @ w - ht) ** 2).mean(-1)
  np.testing.assert_allclose(losses.hidden_mse(hs.astype(np.float32), ht.astype(np.float32),
                                               jnp.asarray(w, jnp.float32)), ref, rtol=1e-4)
  _grads(lambda a, b: losses.hidden_mse(a, ht, b).sum(), hs, w)
  with pytest.raises(ValueError, match='give a projection'):
    losses.hidden_mse(hs, ht)


def test_embedding_cosine_with_padding():
  hs, ht = RNG.randn(2, 4, 5), RNG.randn(2, 4, 5)
  m = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float64)
  pool = lambda h: (h * m[..., None]).sum(1) / m.sum(1, keepdims=True)
  s, t = pool(hs), pool(ht)
  ref = 1 - (s * t).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(t, axis=-1)
  got = losses.embedding_cosine(hs.astype(np.float32), ht.astype(np.float32), jnp.asarray(m))
  np.testing.assert_allclose(got, ref[:, None] * m, rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(got)[1, 2:] == 0)
  _grads(lambda x: losses.embedding_cosine(x, ht, jnp.asarray(m)).sum(), hs)


def test_attention_mse():
  a = np.asarray(jax.nn.softmax(RNG.randn(2, 3, 5, 5), -1), np.float64)
  b = np.asarray(jax.nn.softmax(RNG.randn(2, 3, 5, 5), -1), np.float64)
  np.testing.assert_allclose(losses.attention_mse(a, b), ((a - b) ** 2).mean(axis=(1, 3)), rtol=1e-5)
  _grads(lambda x: losses.attention_mse(x, b).sum(), a)
  with pytest.raises(ValueError, match='same head count'):
    losses.attention_mse(a[:, :2], b)


def _relation(x, heads, valid):
  b, t, d = x.shape
  xr = x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)
  scores = xr @ xr.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  scores = np.where(valid[:, None, None, :] > 0, scores, -np.inf)
  return _log_softmax(scores)


def test_relation_kl_with_padding_and_different_widths():
  xs, xt = RNG.randn(2, 5, 8), RNG.randn(2, 5, 12)
  valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float64)
  s, t = _relation(xs, 2, valid), _relation(xt, 2, valid)
  pt = np.exp(t)
  with np.errstate(invalid='ignore'):  # masked keys: -inf - -inf, where p_t = 0
    ref = (pt * np.where(pt > 0, t - s, 0)).sum(-1).mean(1)
  got = losses.relation_kl(xs.astype(np.float32), xt.astype(np.float32), 2, jnp.asarray(valid))
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  _grads(lambda x: losses.relation_kl(x, xt, 2, jnp.asarray(valid)).sum(), xs)
  with pytest.raises(ValueError, match='not divisible by heads=3'):
    losses.relation_kl(xs, xt, 3)


def test_mix_and_bad_settings():
  np.testing.assert_allclose(losses.mix(jnp.asarray(2.0), jnp.asarray(4.0), 0.25), 2.5)
  with pytest.raises(ValueError, match='alpha=2'):
    losses.mix(1.0, 1.0, 2)
  for t in (0.0, -1.0):
    with pytest.raises(ValueError, match=f'temperature={t}'):
      losses.soft_kl(T_LOGITS, S_LOGITS, t)
  with pytest.raises(ValueError, match='beta=1.0'):
    losses.generalized_jsd(T_LOGITS, S_LOGITS, 1.0)
  with pytest.raises(ValueError, match='share the vocabulary'):
    losses.reverse_kl(T_LOGITS, S_LOGITS[..., :5])
