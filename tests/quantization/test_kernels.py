"""The Pallas weight-only int4 / int8 matmul in interpret mode equals dequantize-then-matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, quantization
from jaxcompress.quantization import kernels


@pytest.mark.parametrize('m,k,n,bits,group_size,symmetric,pack', [
    (1, 64, 32, 4, 16, False, True),      # decode GEMV, packed int4 groups
    (3, 128, 64, 8, None, True, True),    # int8 per-channel, symmetric
    (2, 96, 48, 4, 32, True, False),      # unpacked int4 codes
])
def test_quantized_matmul_matches_dequantize_then_matmul(m, k, n, bits, group_size, symmetric, pack):
  kw, kx = jax.random.split(jax.random.key(m * k + n))
  w = jax.random.normal(kw, (k, n), jnp.float32)
  x = jax.random.normal(kx, (m, k), jnp.float32)
  leaf = quantization.quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric, pack=pack)
  got = kernels.quantized_matmul(x, leaf, block_n=16, interpret=True)
  want = np.asarray(x, np.float64) @ np.asarray(leaf.materialize(), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_quantized_matmul_rejects_other_formats():
  leaf = quantization.quantize_weight(jnp.ones((32, 16)), fmt='nf4', group_size=16)
  with pytest.raises(ValueError, match='fmt=int weight of 4 or 8 bits'):
    kernels.quantized_matmul(jnp.ones((1, 32)), leaf)


@pytest.mark.parametrize('bits,group_size,symmetric', [(4, 16, False), (8, None, True), (3, 16, False)])
def test_dequantize_equals_materialize(bits, group_size, symmetric):
  w = jax.random.normal(jax.random.key(bits), (64, 24), jnp.float32)
  leaf = quantization.quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
  np.testing.assert_array_equal(leaf.dequantize(jnp.float32), leaf.materialize())
  x = jax.random.normal(jax.random.key(9), (2, 5, 64), jnp.float32)
  want = np.asarray(x, np.float64) @ np.asarray(leaf.materialize(), np.float64)
  np.testing.assert_allclose(jax.jit(core.linear)(x, leaf), want, rtol=1e-4, atol=1e-4)


def test_registered_kernel_is_what_core_linear_runs(monkeypatch):
  """The GPU/TPU dispatch, exercised on CPU by registering the (interpreted) kernel for the CPU backend."""
  calls = []

  def interpreted(x, w):
    calls.append(x.shape)
    return kernels.linear(x, w)

  monkeypatch.setitem(core.quantized._KERNELS, 'cpu', (kernels.supports, interpreted))
  monkeypatch.setattr(kernels, 'BLOCK_N', 16)
  w = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
  leaf = quantization.quantize_weight(w, bits=4, group_size=16)
  x = jax.random.normal(jax.random.key(1), (1, 3, 64), jnp.float32)
  want = np.asarray(x, np.float64) @ np.asarray(leaf.materialize(), np.float64)
  np.testing.assert_allclose(core.linear(x, leaf), want, rtol=1e-4, atol=1e-4)
  assert calls == [(1, 3, 64)]
  big = jnp.ones((2, kernels.MAX_ROWS, 64))  # a prefill-sized input takes the dequantize path
  np.testing.assert_allclose(core.linear(big, leaf), big @ leaf.materialize(), rtol=1e-5, atol=1e-4)
  assert len(calls) == 1
