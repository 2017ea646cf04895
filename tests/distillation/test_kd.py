"""Logit distillation: the loss against NumPy float64, and a teacher that gets no gradient."""

import jax
import numpy as np
import pytest

from jaxcompress import distillation
from tests.train.test_step import BATCH, MODEL, TOKENS, _run, chex_close


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def test_distillation_loss_matches_numpy(params):
  teacher_params = jax.jit(MODEL.init)(jax.random.key(9))
  obj = distillation.logit_distillation(MODEL, MODEL, alpha=0.7, temperature=2.0)
  loss, (weight, metrics) = obj(params, teacher_params, BATCH, None)
  s = np.asarray(MODEL.apply(params, BATCH['inputs']), np.float64) / 2
  t = np.asarray(MODEL.apply(teacher_params, BATCH['inputs']), np.float64) / 2
  log_ps = s - np.log(np.exp(s).sum(-1, keepdims=True))
  log_pt = t - np.log(np.exp(t).sum(-1, keepdims=True))
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  logits = 2 * s
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_p, np.asarray(BATCH['targets'])[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss, (0.7 * 4 * kl + 0.3 * nll).sum(), rtol=1e-4)
  np.testing.assert_allclose(metrics['kl'], kl.sum(), rtol=1e-4)
  np.testing.assert_allclose(metrics['nll'], nll.sum(), rtol=1e-5)
  assert weight == TOKENS[:, 1:].size
  # the teacher gets no gradient even though it runs in the same step
  state, h = _run(params, steps=3, objective=obj, frozen=teacher_params)
  assert h[-1]['loss'] < h[0]['loss']
  chex_close(state.frozen, teacher_params, 0.0)


def test_bad_settings_are_named(params):
  with pytest.raises(ValueError, match='alpha=1.5'):
    distillation.logit_distillation(MODEL, MODEL, alpha=1.5)
  with pytest.raises(ValueError, match='temperature=0'):
    distillation.logit_distillation(MODEL, MODEL, temperature=0)
  with pytest.raises(ValueError, match='needs the teacher params'):
    distillation.logit_distillation(MODEL, MODEL)(params, None, BATCH, None)
