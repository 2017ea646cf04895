"""Soft movement pruning against a float64 NumPy reference of Sanh et al.'s equations, and in the training step."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import core
from jaxcompress.pruning._src import movement  # the module (pruning.movement is the method)
from jaxcompress.train import state as state_lib


IN, OUT, ROWS = 6, 4, 16


def _problem():
  rs = np.random.RandomState(0)
  x = rs.randn(ROWS, IN)
  y = x @ (rs.randn(IN, OUT) * (rs.rand(IN, OUT) < 0.5)) + 0.1 * rs.randn(ROWS, OUT)
  return x, y, rs.randn(IN, OUT)


def _loss(params, x, y):
  w = params['layer']['kernel'].materialize()
  return jnp.sum((x @ w - y) ** 2) / ROWS


def _reference(x, y, w, cfg, *, steps, lr):
  """The paper's soft movement in float64: M = 1(S > τ), ∂L/∂S = ∂L/∂W'·W + λσ'(S)/N with Adam on S, SGD on
  W with ∂L/∂W = ∂L/∂W'·M. Returns the masks, scores and weights after each step."""
  s = np.full(w.shape, cfg.initial_score)
  m1 = v1 = np.zeros_like(s)
  b1, b2, eps = 0.9, 0.999, 1e-8
  out = []
  for t in range(1, steps + 1):
    mask = s > cfg.threshold
    g_wp = 2 * x.T @ (x @ (w * mask) - y) / ROWS
    sig = 1 / (1 + np.exp(-s))
    g_s = g_wp * w + cfg.penalty / s.size * sig * (1 - sig)
    g_w = g_wp * mask
    m1 = b1 * m1 + (1 - b1) * g_s
    v1 = b2 * v1 + (1 - b2) * g_s ** 2
    s = s - cfg.score_learning_rate * (m1 / (1 - b1 ** t)) / (np.sqrt(v1 / (1 - b2 ** t)) + eps)
    w = w - lr * g_w
    out.append((s > cfg.threshold, s.copy(), w.copy()))
  return out


def test_straight_through_gradients_equal_the_papers():
  x, y, w = _problem()
  cfg = movement.SoftMovementConfig(initial_score=0.3, threshold=0.0)
  params = movement.with_scores({'layer': {'kernel': jnp.asarray(w, jnp.float32)}}, cfg)
  s = np.where(np.arange(IN * OUT).reshape(IN, OUT) % 3 == 0, -0.2, 0.3)  # a third pruned
  params['layer']['kernel'] = movement.Scored(params['layer']['kernel'].value, jnp.asarray(s, jnp.float32), 0.0)
  g = jax.grad(_loss)(params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))['layer']['kernel']
  mask = s > 0
  g_wp = 2 * x.T @ (x @ (w * mask) - y) / ROWS
  np.testing.assert_allclose(np.asarray(g.scores), g_wp * w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(g.value), g_wp * mask, rtol=1e-4, atol=1e-5)
  assert (np.asarray(g.value)[~mask] == 0).all() and (np.asarray(g.scores)[~mask] != 0).all()


def test_score_updates_and_masks_equal_float64_reference():
  x, y, w = _problem()
  cfg = movement.SoftMovementConfig(penalty=40.0, threshold=0.0, initial_score=0.035, score_learning_rate=0.03,
                                    rules=core.Rules(include=r'kernel$'))
  steps, lr = 8, 0.05
  params = movement.with_scores({'layer': {'kernel': jnp.asarray(w, jnp.float32)}}, cfg)
  tx = movement.soft_movement_optimizer(optax.sgd(lr), cfg)
  state = tx.init(params)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  want = _reference(x, y, w, cfg, steps=steps, lr=lr)
  margins = [np.abs(s).min() for _, s, _ in want]
  assert min(margins) > 1e-3  # no score near τ: float32 and float64 must agree on every mask
  for t, (mask, s, w_t) in enumerate(want):
    updates, state = tx.update(jax.grad(_loss)(params, xj, yj), state, params)
    params = optax.apply_updates(params, updates)
    leaf = params['layer']['kernel']
    np.testing.assert_array_equal(np.asarray(leaf.mask()), mask, err_msg=f'step {t + 1}')
    np.testing.assert_allclose(np.asarray(leaf.scores), s, atol=1e-5)
    np.testing.assert_allclose(np.asarray(leaf.value), w_t, rtol=1e-4, atol=1e-5)
  assert 0 < (~want[-1][0]).sum() < IN * OUT  # some weights were pruned, not all
  assert (~want[2][0] & want[-1][0]).any()  # a weight pruned at step 3 came back: its weight was kept whole
  masked = movement.to_masked(params)['layer']['kernel']
  assert isinstance(masked, core.Masked)
  np.testing.assert_array_equal(np.asarray(masked.mask), want[-1][0])
  np.testing.assert_array_equal(np.asarray(masked.value)[~want[-1][0]], 0)


def test_bad_soft_movement_configs_are_refused():
  params = {'layer': {'kernel': jnp.ones((4, 4))}}
  with pytest.raises(ValueError, match='penalty=-1.0'):
    movement.with_scores(params, movement.SoftMovementConfig(penalty=-1.0))
  with pytest.raises(ValueError, match='initial_score=0.0 must be above threshold=0.0'):
    movement.soft_movement_optimizer(optax.sgd(0.1), movement.SoftMovementConfig(initial_score=0.0))
  with pytest.raises(ValueError, match='selects no parameter'):
    movement.with_scores(params, movement.SoftMovementConfig(rules=core.Rules(include='nothing')))
  with pytest.raises(ValueError, match='prunes dense kernels'):
    movement.with_scores({'layer': {'kernel': core.Masked(jnp.ones((4, 4)), jnp.ones((4, 4), bool))}})


def _topk(s, k):
  """float64 reference of Top_k: the k largest scores, ties to the lower flat index."""
  order = np.argsort(-s.reshape(-1), kind='stable')
  m = np.zeros(s.size, bool)
  m[order[:k]] = True
  return m.reshape(s.shape)


def _hard_reference(x, y, w, s, cfg, *, steps, lr):
  """The paper's hard movement in float64: step t computes with W ⊙ Top_{v_{t-1}}(S), v the cubic schedule
  (v_0 = initial), ∂L/∂S = ∂L/∂W'·W with Adam on S, SGD on W with ∂L/∂W'·M. Returns (mask used at the next
  step, scores, weights) after each step, and the smallest gap between a kept and a pruned score."""
  m1 = v1 = np.zeros_like(s)
  b1, b2, eps = 0.9, 0.999, 1e-8
  cubic = lambda t: cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1 - min(max(
      (t - cfg.begin_step) / (cfg.end_step - cfg.begin_step), 0), 1)) ** 3
  keep = lambda t: int(np.round((1 - cubic(t)) * s.size))
  out, gap = [], np.inf
  for t in range(1, steps + 1):
    mask = _topk(s, keep(t - 1))
    g_wp = 2 * x.T @ (x @ (w * mask) - y) / ROWS
    g_s, g_w = g_wp * w, g_wp * mask
    m1 = b1 * m1 + (1 - b1) * g_s
    v1 = b2 * v1 + (1 - b2) * g_s ** 2
    s = s - cfg.score_learning_rate * (m1 / (1 - b1 ** t)) / (np.sqrt(v1 / (1 - b2 ** t)) + eps)
    w = w - lr * g_w
    nxt = _topk(s, keep(t))
    if 0 < nxt.sum() < s.size:
      gap = min(gap, s[nxt].min() - s[~nxt].max())
    out.append((nxt, s.copy(), w.copy()))
  return out, gap


def test_hard_movement_masks_equal_float64_reference():
  x, y, w = _problem()
  cfg = movement.HardMovementConfig(sparsity=0.6, begin_step=1, end_step=5, score_learning_rate=0.02,
                                    rules=core.Rules(include=r'kernel$'))
  steps, lr = 8, 0.05
  s0 = np.random.RandomState(1).randn(IN, OUT) * 0.05  # distinct scores: no ties for float32 to break otherwise
  params = movement.with_scores({'layer': {'kernel': jnp.asarray(w, jnp.float32)}}, cfg)
  leaf = params['layer']['kernel']
  assert int(leaf.keep) == IN * OUT and np.asarray(leaf.mask()).all()  # the schedule starts dense
  params['layer']['kernel'] = movement.Scored(leaf.value, jnp.asarray(s0, jnp.float32), keep=leaf.keep)
  xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  tx, schedule = movement.hard_movement_optimizer(optax.sgd(lr), cfg), movement.topk_schedule(cfg)
  trained, fixed = state_lib.partition(params, state_lib.floating)  # as loop.fit: the int32 kept count is fixed
  state = tx.init(trained)
  loss = lambda trained: _loss(state_lib.combine(trained, fixed), xj, yj)
  want, gap = _hard_reference(x, y, w, s0, cfg, steps=steps, lr=lr)
  assert gap > 1e-4  # float32 and float64 must agree on every mask
  for t, (mask, s, w_t) in enumerate(want):
    updates, state = tx.update(jax.grad(loss)(trained), state, trained)
    params = state_lib.combine(optax.apply_updates(trained, updates), fixed)
    params, _ = schedule.update(params, (), jnp.int32(t + 1), None)
    trained, fixed = state_lib.partition(params, state_lib.floating)
    leaf = params['layer']['kernel']
    np.testing.assert_array_equal(np.asarray(leaf.mask()), mask, err_msg=f'step {t + 1}')
    np.testing.assert_allclose(np.asarray(leaf.scores), s, atol=1e-5)
    np.testing.assert_allclose(np.asarray(leaf.value), w_t, rtol=1e-4, atol=1e-5)
  assert [int(m.sum()) for m, _, _ in want][-1] == round(0.4 * IN * OUT)  # the schedule reached its target
  came_back = any((~a & b).any() for (a, _, _), (b, _, _) in zip(want[3:], want[4:]))
  assert came_back  # a weight pruned at full sparsity returned: its weight was kept whole, its score moved
  masked = movement.to_masked(params)['layer']['kernel']
  np.testing.assert_array_equal(np.asarray(masked.mask), want[-1][0])
  np.testing.assert_array_equal(np.asarray(masked.value)[~want[-1][0]], 0)
