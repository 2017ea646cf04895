"""`Masked`: dense equivalence, broadcast channel masks, frozen zeros under autodiff and size accounting."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core

IN, OUT = 64, 8


def _value(seed: int = 0, shape: tuple[int, ...] = (IN, OUT)) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mask(seed: int, shape: tuple[int, ...], keep: float = 0.4) -> np.ndarray:
  return np.random.default_rng(100 + seed).uniform(size=shape) < keep


@pytest.mark.parametrize('mask_shape', [(IN, OUT), (IN, 1), (1, OUT)])
def test_materialize_is_where_mask_value_zero(mask_shape):
  value, mask = _value(1), _mask(1, mask_shape)
  m = core.Masked(value=jnp.asarray(value), mask=jnp.asarray(mask))
  assert m.shape == (IN, OUT) and m.dtype == np.float32
  dense = np.asarray(m.materialize())
  np.testing.assert_array_equal(dense, np.where(mask, value, 0.0))
  full = np.broadcast_to(mask, (IN, OUT))
  assert m.kept() == int(full.sum())
  assert m.sparsity() == pytest.approx(1 - full.sum() / (IN * OUT))


def test_channel_masks_zero_whole_rows_and_columns():
  value = _value(2)
  rows = np.zeros((IN, 1), bool)
  rows[[0, 5]] = True
  cols = np.ones((1, OUT), bool)
  cols[0, 3] = False
  dense_rows = np.asarray(core.Masked(jnp.asarray(value), jnp.asarray(rows)).materialize())
  assert set(np.flatnonzero(np.any(dense_rows != 0, axis=1))) == {0, 5}
  dense_cols = np.asarray(core.Masked(jnp.asarray(value), jnp.asarray(cols)).materialize())
  assert np.all(dense_cols[:, 3] == 0) and np.all(np.delete(dense_cols, 3, axis=1) == np.delete(value, 3, axis=1))


@pytest.mark.parametrize('mask_shape', [(IN + 1, OUT), (IN, 2), (2, 1), (3, OUT)])
def test_mask_that_does_not_broadcast_is_rejected(mask_shape):
  with pytest.raises(ValueError, match='mask'):
    core.Masked(value=jnp.asarray(_value()), mask=jnp.ones(mask_shape, bool))


@pytest.mark.parametrize('mask_shape', [(IN + 1,), (2, IN, OUT)])
def test_mask_with_other_rank_that_does_not_broadcast_is_rejected(mask_shape):
  with pytest.raises(ValueError, match='mask'):
    core.Masked(value=jnp.asarray(_value()), mask=jnp.ones(mask_shape, bool))


@pytest.mark.parametrize('mask_shape', [(IN, OUT), (1, OUT)])
def test_gradient_wrt_value_is_zero_where_mask_is_false(mask_shape):
  value, mask = _value(3), _mask(3, mask_shape)
  x = jnp.asarray(_value(4, shape=(5, IN)))

  def loss(v):
    y = core.linear(x, core.Masked(value=v, mask=jnp.asarray(mask)))
    return jnp.sum(jnp.sin(y))

  grad = np.asarray(jax.grad(loss)(jnp.asarray(value)))
  full = np.broadcast_to(mask, (IN, OUT))
  assert np.all(grad[~full] == 0)
  # Where kept, the gradient is that of the dense layer with the pruned weights.
  dense = jnp.asarray(np.where(full, value, 0.0))
  dense_grad = np.asarray(jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(dense))
  np.testing.assert_allclose(grad[full], dense_grad[full], rtol=1e-5, atol=1e-6)


def test_sizes_of_plain_value():
  value, mask = _value(5), _mask(5, (IN, OUT))
  kept = int(mask.sum())
  m = core.Masked(jnp.asarray(value), jnp.asarray(mask))
  assert m.stored_params() == kept
  assert m.memory_bytes() == IN * OUT * 4 + IN * OUT  # float32 value and a bool mask
  assert m.disk_bytes() == kept * 4 + math.ceil(IN * OUT / 8)
  assert m.matmul_flops() == 2 * kept
  assert core.nonzeros(m) == kept  # normal values are never exactly zero


def test_sizes_of_channel_mask():
  value = jnp.asarray(_value(6), jnp.bfloat16)
  mask = np.zeros((1, OUT), bool)
  mask[0, :3] = True
  m = core.Masked(value, jnp.asarray(mask))
  assert m.stored_params() == 3 * IN
  assert m.disk_bytes() == 3 * IN * 2 + math.ceil(OUT / 8)
  assert m.matmul_flops() == 2 * 3 * IN


def test_masked_quantized():
  value, mask = _value(7, shape=(32, 8)), _mask(7, (32, 8))
  qw = core.quantize(jnp.asarray(value), bits=4, group_size=16)
  m = core.Masked(value=qw, mask=jnp.asarray(mask))
  assert m.shape == (32, 8) and m.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(m.materialize()), np.where(mask, np.asarray(qw.materialize()), 0))
  assert m.stored_params() == qw.stored_params()
  assert m.disk_bytes() == qw.disk_bytes() + math.ceil(32 * 8 / 8)
  assert m.memory_bytes() == qw.memory_bytes() + 32 * 8
  assert m.matmul_flops() == 2 * int(mask.sum())
  x = jnp.asarray(_value(8, shape=(3, 32)))
  expected = np.asarray(x, np.float64) @ np.where(mask, np.asarray(qw.materialize(), np.float64), 0)
  np.testing.assert_allclose(np.asarray(core.linear(x, m)), expected, rtol=1e-5, atol=1e-5)


def test_masked_is_a_pytree_of_value_and_mask():
  m = core.Masked(jnp.asarray(_value(9)), jnp.asarray(_mask(9, (IN, OUT))))
  leaves, treedef = jax.tree.flatten(m)
  assert len(leaves) == 2
  back = jax.tree.unflatten(treedef, leaves)
  assert isinstance(back, core.Masked)
  chex.assert_trees_all_equal(back.materialize(), m.materialize())
