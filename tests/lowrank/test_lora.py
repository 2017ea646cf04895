"""LoRA adapters: the model is unchanged at first and only the factors train."""

import jax
import numpy as np
import optax
import pytest

from jaxcompress import core, lowrank
from tests.train.test_step import BATCH, MODEL, _run


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def test_lora_trains_only_adapters(params):
  adapted = lowrank.add_lora(params, jax.random.key(3), rank=4, alpha=8)
  np.testing.assert_allclose(MODEL.apply(adapted, BATCH['inputs']), MODEL.apply(params, BATCH['inputs']),
                             rtol=1e-5, atol=1e-6)  # b = 0 at the start
  state, h = _run(adapted, steps=5, trainable=lowrank.LORA_TRAINABLE)
  for path, leaf in core.flatten(state.params).items():
    before = core.paths.get(adapted, path)
    if isinstance(leaf, core.LoRA):
      np.testing.assert_array_equal(leaf.base, before.base)
      assert np.abs(leaf.lora_b).max() > 0
    else:
      np.testing.assert_array_equal(leaf, before)
  assert h[-1]['loss'] < h[0]['loss']
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert size(state.opt_state) < 0.5 * size(optax.adamw(1e-2).init(params))  # moments of the factors only


def test_bad_rank_is_named(params):
  with pytest.raises(ValueError, match='rank=0 must be >= 1'):
    lowrank.add_lora(params, jax.random.key(0), rank=0)
