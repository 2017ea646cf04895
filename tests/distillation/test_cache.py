"""Cached teacher top-k: the loss against NumPy, the safetensors round trip, and training from the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxcompress.distillation import cache
from tests.train.test_step import MODEL, TOKENS, _run


def test_topk_kl_matches_numpy():
  rng = np.random.RandomState(0)
  t_full = rng.randn(2, 3, 9)
  s = rng.randn(2, 3, 9).astype(np.float32)
  ls = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  idx = np.argsort(-t_full, -1)[..., :4]
  t_logp = np.take_along_axis(ls(t_full), idx, -1)
  p = np.exp(ls(t_logp / 2))
  ref = 4 * (p * (ls(t_logp / 2) - np.take_along_axis(ls(s.astype(np.float64) / 2), idx, -1))).sum(-1)
  got = cache.topk_kl(jnp.asarray(t_logp, jnp.float32), jnp.asarray(idx), s, 2.0)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  with jax.enable_x64(True):
    check_grads(lambda x: cache.topk_kl(jnp.asarray(t_logp), jnp.asarray(idx), x, 2.0).sum(),
                (jnp.asarray(s, jnp.float64),), order=1, modes=('rev',), atol=1e-2, rtol=1e-2)
  with pytest.raises(ValueError, match='temperature=0'):
    cache.topk_kl(t_logp, idx, s, 0)


def test_cache_round_trip_and_training(tmp_path):
  teacher = jax.jit(MODEL.init)(jax.random.key(5))
  logp, idx = cache.teacher_topk(MODEL, teacher, TOKENS[:, :-1], 8)
  full = np.asarray(jax.nn.log_softmax(MODEL.apply(teacher, TOKENS[:, :-1]), -1))
  np.testing.assert_allclose(logp.astype(np.float32), -np.sort(-full, -1)[..., :8], atol=1e-2)
  cache.save_topk(tmp_path / 'topk.safetensors', TOKENS, logp, idx)
  rows, logp2, idx2 = cache.load_topk(tmp_path / 'topk.safetensors')
  assert (rows == TOKENS).all() and (logp2 == logp).all() and (idx2 == idx).all()
  data = cache.TopkBatches(rows, logp2, idx2, batch_size=8, seed=0)
  b = data.batch(0)
  sel = data._lm.rows(0)  # each row's cached top-k travels with it
  assert (b['inputs'] == TOKENS[sel, :-1]).all() and (b['topk_idx'] == idx[sel]).all()
  params = jax.jit(MODEL.init)(jax.random.key(0))
  _, h = _run(params, steps=3, objective=cache.cached_distillation(MODEL, alpha=0.9),
              batch={k: jnp.asarray(v) for k, v in b.items()})
  assert h[-1]['loss'] < h[0]['loss']
