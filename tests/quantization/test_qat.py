"""Quantization-aware training: fake quantization in the forward pass, gradients straight through."""

import jax
import numpy as np
import pytest

from jaxcompress import core, quantization
from jaxcompress.quantization._src.llm_qat import distillation_objective
from jaxcompress.train import objectives
from tests.train.test_step import BATCH, MODEL, _run, chex_close


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


@pytest.mark.slow
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
  obj = distillation_objective(MODEL)
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


def test_finalize_gives_quantized_leaves_computing_the_fake_quant_forward_exactly(params):
  w = core.paths.get(params, 'layers/0/mlp/up_proj/kernel')
  mask = np.random.default_rng(0).random(w.shape) > 0.5
  masked = core.paths.replace(params, {'layers/0/mlp/up_proj/kernel': core.Masked(w * mask, mask)})
  for act_bits in (None, 6):
    fq = quantization.fake_quant(bits=3, group_size=16, act_bits=act_bits)
    trained = jax.jit(lambda p: fq.forward(p, ()))(masked)
    final = jax.jit(lambda p: quantization.finalize_qat(p, bits=3, group_size=16, act_bits=act_bits))(masked)
    dense_final, dense_trained = (core.flatten(jax.jit(core.materialize_tree)(t)) for t in (final, trained))
    for path in core.select(masked).paths:
      leaf = core.paths.get(final, path)
      inner = leaf.w if act_bits else leaf
      assert isinstance(leaf, quantization.ActQuantized) == (act_bits is not None)
      if path == 'layers/0/mlp/up_proj/kernel':
        assert isinstance(inner, core.Masked) and isinstance(inner.value, core.Quantized)
        np.testing.assert_array_equal(np.asarray(inner.mask), mask)
      else:
        assert isinstance(inner, core.Quantized) and inner.bits == 3 and inner.group_size == 16
      np.testing.assert_array_equal(np.asarray(dense_final[path]), np.asarray(dense_trained[path]))
  apply = jax.jit(MODEL.apply)  # with act_bits: the activations are rounded alike too
  np.testing.assert_array_equal(np.asarray(apply(final, BATCH['inputs'])), np.asarray(apply(trained, BATCH['inputs'])))


def test_act_quantized_matmul_is_the_float64_per_token_rounding_and_round_trips(tmp_path):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  x[0, 0] = 0.0  # an all-zero token keeps scale 1, never 0/0
  w = rng.normal(size=(16, 8)).astype(np.float32)
  leaf = quantization.ActQuantized(core.quantize(w, bits=4, group_size=8), bits=5)
  x64, qmax = x.astype(np.float64), 2 ** 4 - 1
  s = np.abs(x64).max(-1, keepdims=True) / qmax
  s[s == 0] = 1.0
  want = np.clip(np.round(x64 / s), -qmax, qmax) * s @ np.asarray(leaf.w.materialize(), np.float64)
  got = np.asarray(core.linear(jax.numpy.asarray(x), leaf), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.isfinite(got).all() and not np.allclose(got, x64 @ np.asarray(leaf.w.materialize(), np.float64))
  grad = jax.grad(lambda v: core.linear(v, leaf).sum())(jax.numpy.asarray(x))  # straight through the rounding
  np.testing.assert_allclose(np.asarray(grad), np.broadcast_to(np.asarray(leaf.w.materialize()).sum(1), x.shape),
                             rtol=1e-5)
  path = tmp_path / 'a.jxc'
  written = core.serialize.save(path, {'k': leaf})
  back = core.serialize.load(path)['k']
  assert isinstance(back, quantization.ActQuantized) and back.bits == 5
  np.testing.assert_array_equal(np.asarray(back.materialize()), np.asarray(leaf.materialize()))
  assert written == core.stats.totals({'k': leaf}).disk == core.disk_bytes(leaf.w)
  with pytest.raises(ValueError, match='act_bits=1'):
    quantization.fake_quant(act_bits=1)
