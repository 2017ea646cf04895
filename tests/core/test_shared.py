"""`Shared`, `tie`, `resolve`, `count_uses`: one stored tensor used in several places."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress.core import shared as shared_lib

D, H = 6, 8
UP0, UP1 = 'layers/0/mlp/up/kernel', 'layers/1/mlp/up/kernel'


def _params(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      'embed': {'embedding': normal(11, D)},
      'layers': {i: {'mlp': {'up': {'kernel': normal(D, H)}, 'down': {'kernel': normal(H, D)}}} for i in (0, 1)},
  }


def test_tie_stores_once_and_resolve_puts_storage_at_every_place():
  params = _params()
  tied = core.tie(params, [UP0, UP1], name='up')
  ref0, ref1 = tied['layers'][0]['mlp']['up']['kernel'], tied['layers'][1]['mlp']['up']['kernel']
  assert isinstance(ref0, core.Shared) and ref0 == ref1
  assert (ref0.name, ref0.shape, ref0.dtype) == ('up', (D, H), np.float32)
  chex.assert_trees_all_equal(tied[core.SHARED]['up'], params['layers'][0]['mlp']['up']['kernel'])
  assert shared_lib.count_uses(tied) == {'up': 2}
  resolved = core.resolve(tied)
  assert core.SHARED not in resolved
  for i in (0, 1):
    chex.assert_trees_all_equal(resolved['layers'][i]['mlp']['up']['kernel'], tied[core.SHARED]['up'])
    chex.assert_trees_all_equal(resolved['layers'][i]['mlp']['down'], params['layers'][i]['mlp']['down'])
  chex.assert_trees_all_equal(core.resolve(resolved), resolved)  # idempotent
  # The input tree is not mutated.
  assert core.SHARED not in params and not core.is_compressed(params['layers'][1]['mlp']['up']['kernel'])


def test_tie_with_explicit_value():
  value = jnp.full((D, H), 0.5)
  tied = core.tie(_params(), [UP0, UP1], name='up', value=value)
  chex.assert_trees_all_equal(core.resolve(tied)['layers'][0]['mlp']['up']['kernel'], value)


def _loss(params: dict, x: jax.Array) -> jax.Array:
  h = x
  for i in (0, 1):
    mlp = params['layers'][i]['mlp']
    h = h + core.linear(jnp.tanh(core.linear(h, mlp['up']['kernel'])), mlp['down']['kernel'])
  return jnp.sum(h ** 2)


def test_gradient_of_storage_is_sum_of_gradients_at_each_use():
  params = _params(1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, D)), jnp.float32)
  tied = core.tie(params, [UP0, UP1], name='up')
  grads = jax.grad(lambda p: _loss(core.resolve(p), x))(tied)
  # Untied, with both places holding the same array: the tied gradient must be the sum of the two.
  untied = core.resolve(tied)
  untied_grads = jax.grad(_loss)(untied, x)
  expected = untied_grads['layers'][0]['mlp']['up']['kernel'] + untied_grads['layers'][1]['mlp']['up']['kernel']
  chex.assert_trees_all_close(grads[core.SHARED]['up'], expected, rtol=1e-5, atol=1e-6)
  for i in (0, 1):
    chex.assert_trees_all_close(grads['layers'][i]['mlp']['down'], untied_grads['layers'][i]['mlp']['down'],
                                rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(untied_grads['layers'][0]['mlp']['up']['kernel']), 0)
  assert not np.allclose(np.asarray(untied_grads['layers'][1]['mlp']['up']['kernel']), 0)


def test_tie_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='shape'):
    core.tie(_params(), [UP0, 'layers/0/mlp/down/kernel'], name='x')
  with pytest.raises(ValueError, match='shape'):
    core.tie(_params(), [UP0], name='x', value=jnp.zeros((H, D)))


def test_tie_rejects_unknown_paths_and_empty_paths():
  with pytest.raises(KeyError, match='layers/7/mlp/up/kernel'):
    core.tie(_params(), [UP0, 'layers/7/mlp/up/kernel'], name='up')
  with pytest.raises(ValueError, match='paths'):
    core.tie(_params(), [], name='up')


def test_tie_rejects_duplicate_name():
  tied = core.tie(_params(), [UP0, UP1], name='up')
  with pytest.raises(ValueError, match="'up'"):
    core.tie(tied, ['layers/0/mlp/down/kernel', 'layers/1/mlp/down/kernel'], name='up')
  again = core.tie(tied, ['layers/0/mlp/down/kernel', 'layers/1/mlp/down/kernel'], name='down')
  assert sorted(again[core.SHARED]) == ['down', 'up']
  assert shared_lib.count_uses(again) == {'up': 2, 'down': 2}


def test_unresolved_reference_raises_mentioning_resolve():
  ref = core.tie(_params(), [UP0, UP1], name='up')['layers'][0]['mlp']['up']['kernel']
  with pytest.raises(ValueError, match='resolve'):
    ref.materialize()
  with pytest.raises(ValueError, match='resolve'):
    core.linear(jnp.ones((2, D)), ref)


def test_resolve_with_missing_storage_names_it():
  tied = core.tie(_params(), [UP0, UP1], name='up')
  broken = {**tied, core.SHARED: {}}
  with pytest.raises(KeyError, match='up'):
    core.resolve(broken)


def test_reference_costs_nothing():
  ref = core.tie(_params(), [UP0, UP1], name='up')['layers'][0]['mlp']['up']['kernel']
  assert (ref.stored_params(), ref.memory_bytes(), ref.disk_bytes(), ref.matmul_flops()) == (0, 0, 0, 0)
  assert jax.tree.leaves(ref) == []
