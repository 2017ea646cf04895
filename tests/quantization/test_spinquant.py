"""SpinQuant: Cayley SGD against a float64 NumPy reference of its update, the learned rotation stays orthogonal and
leaves the function unchanged (Llama, Qwen2, online-rotated), it lowers the loss it is learned for, and bad input
is refused by name."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import quantization, recipes
from jaxcompress.quantization._src import spinquant as sq
from tests.quantization.test_quarot import _gpt2, _llama, _perturbed, _tokens


def _cayley_ref(g, r, lr):
  """NumPy float64: A = G Rᵀ − R Gᵀ, R' = (I + lr/2 A)⁻¹ (I − lr/2 A) R."""
  g, r = g.astype(np.float64), r.astype(np.float64)
  a = g @ r.T - r @ g.T
  eye = np.eye(r.shape[0])
  return np.linalg.solve(eye + 0.5 * lr * a, (eye - 0.5 * lr * a) @ r)


def _orthogonal(n, seed):
  q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
  return q.astype(np.float32)


def test_cayley_step_equals_a_float64_reference_and_stays_orthogonal():
  rng = np.random.default_rng(0)
  r = _orthogonal(16, 0)
  g = rng.standard_normal((16, 16)).astype(np.float32)
  opt = quantization.cayley_sgd(0.3)
  updates, _ = opt.update({'r': jnp.asarray(g)}, opt.init({'r': r}), {'r': jnp.asarray(r)})
  new = np.asarray(optax.apply_updates({'r': jnp.asarray(r)}, updates)['r'])
  np.testing.assert_allclose(new, _cayley_ref(g, r, 0.3), rtol=1e-4, atol=1e-5)
  x = jnp.asarray(r)  # many steps: still orthogonal, and the loss tr(Cᵀ R) it descends goes down
  c = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
  loss = lambda x: -jnp.sum(c * x)
  state = opt.init(x)
  start = float(loss(x))
  for _ in range(50):
    u, state = opt.update(jax.grad(loss)(x), state, x)
    x = optax.apply_updates(x, u)
  np.testing.assert_allclose(np.asarray(x.T @ x), np.eye(16), atol=2e-5)
  assert float(loss(x)) < start - 1.0
  with pytest.raises(ValueError, match='cayley_sgd: update needs params'):
    opt.update({'r': jnp.asarray(g)}, opt.init(None))


@pytest.mark.parametrize('name, model, online', [
    ('llama untied', _llama(), False),
    ('qwen2 tied, qkv and o biases', _llama(tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                                            model_type='qwen2'), False),
    ('llama, online Hadamard', _llama(), True),
])
def test_any_orthogonal_rotation_after_quarot_is_the_same_function(name, model, online):
  del name
  params = _perturbed(model)
  m, p = quantization.quarot(model, params, config=quantization.QuaRotConfig(online=online), key=jax.random.key(0))
  hd = model.config.dim_per_head
  r2 = [jnp.asarray(_orthogonal(hd, 2 + i)) for i in range(2)]  # each block's value rotation (R2)
  rotated = sq.rotate(m, p, jnp.asarray(_orthogonal(32, 1)), r2)
  tokens = _tokens()
  want = np.asarray(model.apply(params, tokens))
  np.testing.assert_allclose(np.asarray(m.apply(rotated, tokens)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  assert not np.allclose(np.asarray(rotated['embed']['tokens']['embedding']),
                         np.asarray(p['embed']['tokens']['embedding']), atol=1e-3)
  # R2 alone: v_proj's columns of each head, NumPy float64 against the weight as rotated by R1 alone
  by_r1 = sq.rotate(m, p, jnp.asarray(_orthogonal(32, 1)))
  wv = np.asarray(by_r1['layers'][1]['attn']['v_proj']['kernel'], np.float64)
  want_v = np.concatenate([wv[:, h * hd:(h + 1) * hd] @ np.asarray(r2[1], np.float64)
                           for h in range(wv.shape[1] // hd)], axis=1)
  np.testing.assert_allclose(np.asarray(rotated['layers'][1]['attn']['v_proj']['kernel']), want_v, atol=1e-5)
  wo = np.asarray(by_r1['layers'][0]['attn']['o_proj']['kernel'], np.float64)
  want_o = np.concatenate([np.asarray(r2[0], np.float64).T @ wo[h * hd:(h + 1) * hd]
                           for h in range(wo.shape[0] // hd)], axis=0)
  np.testing.assert_allclose(np.asarray(rotated['layers'][0]['attn']['o_proj']['kernel']), want_o, atol=1e-5)


@pytest.mark.slow
def test_learning_lowers_the_quantized_loss_and_keeps_the_function():
  model = _llama()
  m, p = quantization.quarot(model, _perturbed(model), config=quantization.QuaRotConfig(online=True),
                             key=jax.random.key(0))
  tokens = _tokens(shape=(4, 17))
  ctx = recipes.Context(calib=({'tokens': tokens},))
  cfg = dict(bits=2, group_size=16, act_bits=4)
  fq = quantization.fake_quant(m.selection_rules(quantization.SpinQuantConfig().rules), **cfg)

  def qloss(params):
    logits = m.apply(fq.forward(params, None), tokens[:, :-1])
    return float(optax.losses.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean())
  _, learned = quantization.spinquant(m, p, ctx, config=quantization.SpinQuantConfig(steps=30, lr=1.0, **cfg))
  assert qloss(learned) < qloss(p) - 0.01, (qloss(p), qloss(learned))
  want = np.asarray(m.apply(p, tokens))
  np.testing.assert_allclose(np.asarray(m.apply(learned, tokens)), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  _, again = quantization.spinquant(m, p, ctx, config=quantization.SpinQuantConfig(steps=30, lr=1.0, **cfg))
  for x, y in zip(jax.tree.leaves(learned), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # R2 learned too: R1 alone gives other weights (and its own lower loss)
  _, r1 = quantization.spinquant(m, p, ctx, config=quantization.SpinQuantConfig(steps=30, lr=1.0, r2=False, **cfg))
  value = lambda tree: np.asarray(tree['layers'][0]['attn']['v_proj']['kernel'])
  assert not np.allclose(value(r1), value(learned), atol=1e-3)
  print(f'quantized loss: start {qloss(p):.4f}, R1 {qloss(r1):.4f}, R1 + R2 {qloss(learned):.4f}')
  assert qloss(r1) < qloss(p) - 0.01


def test_refusals_name_the_parameter():
  model = _llama()
  params = _perturbed(model)
  ctx = recipes.Context(calib=({'tokens': _tokens()},))
  with pytest.raises(ValueError, match=r'spinquant: final_norm/scale is not all ones.*quarot > spinquant'):
    quantization.spinquant(model, params, ctx)
  gpt2 = _gpt2()
  with pytest.raises(ValueError, match='spinquant: GPT2 is not an RMSNorm decoder'):
    quantization.spinquant(gpt2, gpt2.init(jax.random.key(0)), ctx)
  with pytest.raises(ValueError, match=r'spinquant: lr=0.0 is outside \(0, inf\)'):
    recipes.parse('spinquant(lr=0.0)')
  m, p = recipes.run(recipes.parse('quarot > rtn(bits=4, group_size=16)'), ctx, model, params)
  with pytest.raises(ValueError, match='spinquant: layers/0/.* is already Quantized'):
    quantization.spinquant(m, p, ctx)
  m, p = quantization.quarot(model, params, key=jax.random.key(0))
  with pytest.raises(ValueError, match='needs calibration batches'):
    quantization.spinquant(m, p, recipes.Context(calib=()))
