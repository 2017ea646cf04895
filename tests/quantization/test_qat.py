"""Quantization-aware training: fake quantization in the forward pass, gradients straight through."""

import jax
import numpy as np
import pytest

from jaxcompress import core, quantization
from jaxcompress.train import objectives
from tests.train.test_step import BATCH, MODEL, _run, chex_close


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def test_fake_quant_forward_is_quantized_and_gradients_pass_straight_through(params):
  qat = quantization.fake_quant(bits=3, group_size=16)
  state = qat.init(params)
  objective = objectives.causal_lm(MODEL)
  quantized = core.select(params).map(lambda _, w: core.fake_quantize(w, bits=3, group_size=16, pack=False), params)
  qat_loss = jax.jit(jax.value_and_grad(lambda p: objective(qat.forward(p, state), None, BATCH, None)[0]))
  quant_loss = jax.jit(jax.value_and_grad(lambda p: objective(p, None, BATCH, None)[0]))
  loss_qat, grads = qat_loss(params)
  loss_quant, ref = quant_loss(quantized)
  np.testing.assert_allclose(loss_qat, loss_quant, rtol=1e-5)
  # STE: d/dw of the fake-quantized model equals d/dw_q of the quantized model's loss.
  chex_close(grads, ref, 1e-4)
  _, h = _run(params, steps=4, transforms=qat)
  assert h[-1]['loss'] < h[0]['loss']


def test_fake_quant_refuses_other_compressed_kinds(params):
  w = core.paths.get(params, 'layers/0/mlp/up_proj/kernel')
  lowrank = core.paths.replace(params, {'layers/0/mlp/up_proj/kernel': core.LowRank(w[:, :4], w[:4, :])})
  with pytest.raises(TypeError, match='cannot fake-quantize a LowRank weight'):
    quantization.fake_quant(bits=4, group_size=16).forward(lowrank, ())


def test_llm_qat_objective_is_the_float64_kl_to_the_teacher(params):
  student = core.select(params).map(lambda _, w: core.fake_quantize(w, bits=3, group_size=16, pack=False), params)
  obj = quantization.llm_qat.distillation_objective(MODEL)
  loss, (weight, metrics) = obj(student, params, BATCH, None)
  t = np.asarray(MODEL.apply(params, BATCH['inputs']), np.float64)
  s = np.asarray(MODEL.apply(student, BATCH['inputs']), np.float64)
  log_t = t - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True)) - t.max(-1, keepdims=True)
  log_s = s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True)
  mask = np.asarray(BATCH.get('mask', np.ones(BATCH['targets'].shape)), np.float64)
  want = ((np.exp(log_t) * (log_t - log_s)).sum(-1) * mask).sum()
  # The KL is a small difference of float32 log-probabilities (~1e-2 here): 1e-3 relative is ~1e-5 absolute.
  np.testing.assert_allclose(loss, want, rtol=1e-3)
  assert float(weight) == mask.sum() and float(metrics['kl']) == float(loss)
  assert abs(float(obj(params, params, BATCH, None)[0])) < 1e-4  # the teacher itself: zero divergence
  with pytest.raises(ValueError, match='frozen=params'):
    obj(student, None, BATCH, None)
