"""`LowRank`: W = a @ b, applied as two thin matmuls, with plain or quantized factors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core

IN, RANK, OUT = 64, 3, 8


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_materialize_is_product_of_factors():
  a, b = _normal(0, (IN, RANK)), _normal(1, (RANK, OUT))
  lr = core.LowRank(jnp.asarray(a), jnp.asarray(b))
  assert lr.shape == (IN, OUT) and lr.rank == RANK and lr.dtype == np.float32
  np.testing.assert_allclose(np.asarray(lr.materialize()), a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('batch_shape', [(5,), (2, 3)])
def test_linear_matches_float64_reference(batch_shape):
  a, b = _normal(2, (IN, RANK)), _normal(3, (RANK, OUT))
  x = _normal(4, (*batch_shape, IN))
  bias = _normal(5, (OUT,))
  y = core.linear(jnp.asarray(x), core.LowRank(jnp.asarray(a), jnp.asarray(b)), jnp.asarray(bias))
  assert y.shape == (*batch_shape, OUT)
  expected = x.astype(np.float64) @ (a.astype(np.float64) @ b) + bias
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4)


def test_quantized_factors():
  a, b = _normal(6, (IN, RANK)), _normal(7, (RANK, OUT))
  qa = core.quantize(jnp.asarray(a), bits=8, group_size=16)
  qb = core.quantize(jnp.asarray(b), bits=4, group_size=None)
  lr = core.LowRank(qa, qb)
  assert lr.shape == (IN, OUT) and lr.rank == RANK
  da, db = np.asarray(qa.materialize(), np.float64), np.asarray(qb.materialize(), np.float64)
  np.testing.assert_allclose(np.asarray(lr.materialize()), da @ db, rtol=1e-5, atol=1e-5)
  x = _normal(8, (3, IN))
  np.testing.assert_allclose(np.asarray(core.linear(jnp.asarray(x), lr)), x @ da @ db, rtol=1e-5, atol=1e-4)
  assert lr.stored_params() == IN * RANK + RANK * OUT
  assert lr.disk_bytes() == qa.disk_bytes() + qb.disk_bytes()
  assert lr.memory_bytes() == qa.memory_bytes() + qb.memory_bytes()
  assert lr.matmul_flops() == 2 * RANK * (IN + OUT)


def test_sizes_of_plain_factors():
  lr = core.LowRank(jnp.zeros((IN, RANK), jnp.bfloat16), jnp.zeros((RANK, OUT), jnp.bfloat16))
  assert lr.dtype == jnp.bfloat16
  assert lr.stored_params() == RANK * (IN + OUT)
  assert lr.memory_bytes() == lr.disk_bytes() == 2 * RANK * (IN + OUT)
  assert lr.matmul_flops() == core.matmul_flops(lr) == 2 * RANK * (IN + OUT)
  assert core.matmul_flops(jnp.zeros((IN, OUT))) == 2 * IN * OUT


@pytest.mark.parametrize('a_shape, b_shape', [
    ((IN, RANK), (RANK + 1, OUT)),
    ((IN,), (RANK, OUT)),
    ((IN, RANK), (RANK, OUT, 2)),
])
def test_bad_factor_shapes_are_rejected(a_shape, b_shape):
  with pytest.raises(ValueError, match='factors'):
    core.LowRank(jnp.zeros(a_shape), jnp.zeros(b_shape))
