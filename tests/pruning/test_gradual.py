"""Pruning during training: the cubic schedule, gradual magnitude, SET / RigL and recovery with frozen
masks, through the real training step."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import core, pruning
from jaxcompress.pruning._src import gradual  # the module (pruning.gradual is the method)
from tests.train.test_step import MODEL, _run


PATH = 'layers/1/mlp/down_proj/kernel'


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def test_cubic_schedule_equals_zhu_gupta():
  for t in (0, 5, 10, 37, 60, 100, 200):
    want = 0.8 + (0.1 - 0.8) * (1 - min(max((t - 10) / 50, 0), 1)) ** 3
    got = float(gradual.cubic_sparsity(t, initial=0.1, final=0.8, begin_step=10, end_step=60))
    assert abs(got - want) < 1e-6, t


def test_gradual_magnitude_reaches_target_and_prunes_smallest(params):
  # frequency 2 from step 1 would skip step 4: the end step prunes anyway, to the final sparsity
  cfg = gradual.GradualConfig(final_sparsity=0.75, begin_step=1, end_step=4, frequency=2,
                              rules=core.Rules(include=r'mlp/.*kernel$'))
  state, history = _run(params, steps=4, tx=optax.sgd(0.1), transforms=gradual.gradual_magnitude(cfg))
  w = np.asarray(core.paths.get(state.params, PATH))
  mask = np.asarray(core.paths.get(state.transform_state, PATH))
  assert abs((w == 0).mean() - 0.75) < 1e-3 and np.array_equal(w != 0, mask)
  assert core.paths.get(state.transform_state, 'layers/1/attn/q_proj/kernel') is None
  assert (np.asarray(core.paths.get(state.params, 'layers/1/attn/q_proj/kernel')) != 0).all()
  assert np.isfinite([m['loss'] for m in history]).all()


def test_rigl_drop_and_grow_equals_numpy():
  rs = np.random.RandomState(0)
  mask = rs.rand(8, 6) < 0.5
  w = rs.randn(8, 6) * mask
  g = rs.randn(8, 6)
  new = np.asarray(gradual._drop_and_grow(jnp.asarray(mask), jnp.asarray(w), jnp.asarray(g), jax.random.key(0),
                                          jnp.float32(0.25), 'rigl'))
  k = int(round(0.25 * mask.sum()))
  kept = np.flatnonzero(mask)
  dropped = kept[np.argsort(np.abs(w.reshape(-1)[kept]), kind='stable')[:k]]
  after = mask.reshape(-1).copy()
  after[dropped] = False
  free = np.flatnonzero(~after)
  grown = free[np.argsort(-np.abs(g.reshape(-1)[free]), kind='stable')[:k]]
  want = after.copy()
  want[grown] = True
  np.testing.assert_array_equal(new.reshape(-1), want)
  assert new.sum() == mask.sum()


def test_set_regrows_as_many_as_it_drops():
  rs = np.random.RandomState(3)
  mask = jnp.asarray(rs.rand(16, 8) < 0.3)
  new = gradual._drop_and_grow(mask, jnp.asarray(rs.randn(16, 8)), None, jax.random.key(1), jnp.float32(0.5), 'set')
  assert int(new.sum()) == int(mask.sum()) and not np.array_equal(np.asarray(new), np.asarray(mask))


def test_rigl_training_keeps_constant_sparsity(params):
  cfg = gradual.SparseTrainingConfig(method='rigl', sparsity=0.5, rules=core.Rules(include=r'mlp/.*kernel$'),
                                     update_every=2, end_step=10)
  tx = gradual.sparse_optimizer(optax.adam(1e-2), cfg)
  state, history = _run(params, steps=3, tx=tx)
  m1 = np.asarray(core.paths.get(tx.init(params).masks, PATH))
  m3 = np.asarray(core.paths.get(state.opt_state.masks, PATH))
  w = np.asarray(core.paths.get(state.params, PATH))
  assert m3.mean() == 0.5 and not np.array_equal(m1, m3)  # the mask moved at step 2, its size did not
  np.testing.assert_array_equal(w != 0, m3)  # regrown entries start at zero, then train
  assert np.isfinite([m['loss'] for m in history]).all()


@pytest.mark.parametrize('method', ['set', 'rigl'])
def test_magnitude_init_starts_from_the_magnitude_mask(method):
  rs = np.random.RandomState(1)
  params = {'layers': [{'k': {'kernel': jnp.asarray(rs.randn(8, 5), jnp.float32)}}], 'head': jnp.ones((3,))}
  tx = gradual.sparse_optimizer(optax.sgd(0.1), gradual.SparseTrainingConfig(method=method, sparsity=0.7,
                                                                              init='magnitude'))
  got = np.asarray(tx.init(params).masks['layers'][0]['k']['kernel'])
  a = np.abs(np.asarray(params['layers'][0]['k']['kernel'])).reshape(-1)
  want = np.zeros(a.size, bool)
  want[np.argsort(-a)[:round(0.3 * a.size)]] = True  # the 30% largest |W| (distinct values: no ties)
  np.testing.assert_array_equal(got, want.reshape(8, 5))
  rand = gradual.sparse_optimizer(optax.sgd(0.1), gradual.SparseTrainingConfig(method=method, sparsity=0.7))
  r = np.asarray(rand.init(params).masks['layers'][0]['k']['kernel'])
  assert r.sum() == want.sum() and not np.array_equal(r, want.reshape(8, 5))  # the default stays random


def test_recovery_with_frozen_masks(params):
  pruned = pruning.prune(params, sparsity=0.5)
  state, _ = _run(pruned, steps=2, tx=optax.adamw(1e-2, weight_decay=0.1))
  leaf = core.paths.get(state.params, PATH)
  before = core.paths.get(pruned, PATH)
  np.testing.assert_array_equal(np.asarray(leaf.mask), np.asarray(before.mask))
  dense = np.asarray(leaf.materialize())
  assert (dense[~np.asarray(before.mask)] == 0).all()
  assert np.any(dense != np.asarray(before.materialize()))


def test_bad_training_configs_are_refused(params):
  with pytest.raises(ValueError, match='sparsity'):
    gradual.gradual_magnitude(gradual.GradualConfig(final_sparsity=1.2))
  with pytest.raises(ValueError, match='method'):
    gradual.sparse_optimizer(optax.sgd(0.1), gradual.SparseTrainingConfig(method='lottery'))
  with pytest.raises(ValueError, match="init='lottery' must be 'random'"):
    gradual.sparse_optimizer(optax.sgd(0.1), gradual.SparseTrainingConfig(init='lottery'))
  with pytest.raises(ValueError, match='selects no parameter'):
    gradual.gradual_magnitude(gradual.GradualConfig(rules=core.Rules(include='nothing'))).init(params)
