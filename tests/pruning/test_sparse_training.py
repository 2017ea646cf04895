"""Sparse training under fixed masks: masks in the optimizer state and a transform that keeps them applied."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import core, pruning
from tests.train.test_step import MODEL, _run


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def test_masks_in_optimizer_state_stay_applied(params):
  path = 'layers/1/mlp/down_proj/kernel'
  w = core.paths.get(params, path)
  mask = jax.random.bernoulli(jax.random.key(6), 0.3, w.shape)
  tx = pruning.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), {path: mask})
  start = core.paths.replace(params, {path: jnp.where(mask, w, 0)})
  state, _ = _run(start, steps=4, tx=tx, transforms=pruning.keep_masks({path: mask}))
  trained = np.asarray(core.paths.get(state.params, path))
  assert np.all(trained[~np.asarray(mask)] == 0)
  assert np.any(trained[np.asarray(mask)] != np.asarray(w)[np.asarray(mask)])
  np.testing.assert_array_equal(core.paths.get(state.transform_state, path), mask)  # the state is the masks


def test_keep_masks_alone_zeroes_a_dense_start(params):
  path = 'layers/0/attn/q_proj/kernel'
  mask = jax.random.bernoulli(jax.random.key(7), 0.5, core.paths.get(params, path).shape)
  state, _ = _run(params, steps=1, transforms=pruning.keep_masks({path: mask}))
  assert np.all(np.asarray(core.paths.get(state.params, path))[~np.asarray(mask)] == 0)


def test_bad_masks_are_named(params):
  with pytest.raises(KeyError, match='keep_masks: no parameter at .*layers/9/x'):
    pruning.keep_masks({'layers/9/x': jnp.ones((2, 2), bool)}).init(params)
  with pytest.raises(ValueError, match='the mask for layers/0/attn/q_proj/kernel has shape \\(3, 3\\)'):
    pruning.masked_optimizer(optax.sgd(0.1), {'layers/0/attn/q_proj/kernel': jnp.ones((3, 3), bool)}).init(params)
