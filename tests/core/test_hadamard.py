"""The fast Walsh–Hadamard transform against dense float64 matrices built here from the definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress.core import hadamard


def _sylvester(p):
  h = np.ones((1, 1))
  while h.shape[0] < p:
    h = np.block([[h, h], [h, -h]])
  return h


def _paley(q):
  """Paley I from the quadratic character mod q (q prime, q % 4 == 3), written out independently."""
  residues = {(i * i) % q for i in range(1, q)}
  chi = lambda r: 0 if r % q == 0 else (1 if r % q in residues else -1)
  h = np.zeros((q + 1, q + 1))
  h[0, :] = 1
  h[1:, 0] = -1
  for i in range(q):
    for j in range(q):
      h[i + 1, j + 1] = chi(j - i) + (1 if i == j else 0)
  return h


def _dense(n):
  """H_n = H_m ⊗ H_(2^k), float64."""
  for m in (1, 12, 20):
    if n % m == 0 and (n // m) & (n // m - 1) == 0:
      return np.kron(np.ones((1, 1)) if m == 1 else _paley(m - 1), _sylvester(n // m))
  raise AssertionError(n)


@pytest.mark.parametrize('n', [1, 2, 8, 64, 12, 24, 20, 40, 384, 768])
def test_transform_is_x_times_normalized_hadamard(n):
  want_h = _dense(n)
  np.testing.assert_array_equal(want_h @ want_h.T, n * np.eye(n))  # a Hadamard matrix by definition
  np.testing.assert_array_equal(hadamard.hadamard_matrix(n), want_h)
  x = np.random.default_rng(n).standard_normal((3, 5, n))
  got = np.asarray(core.hadamard_transform(jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(got, x @ want_h / np.sqrt(n), atol=2e-5 * np.sqrt(np.log2(n) + 1), rtol=0)
  # over another axis: Hᵀ w for a kernel [n, out]
  w = np.random.default_rng(n + 1).standard_normal((n, 7))
  got = np.asarray(core.hadamard_transform(jnp.asarray(w, jnp.float32), axis=0))
  np.testing.assert_allclose(got, want_h.T @ w / np.sqrt(n), atol=2e-5 * np.sqrt(np.log2(n) + 1), rtol=0)


def test_orthogonal_and_block_diagonal_fallback():
  x = np.random.default_rng(0).standard_normal((4, 96))
  y = np.asarray(core.hadamard_transform(jnp.asarray(x, jnp.float32), block=32))
  want = np.concatenate([x[:, i:i + 32] @ _sylvester(32) / np.sqrt(32) for i in range(0, 96, 32)], axis=1)
  np.testing.assert_allclose(y, want, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)


@pytest.mark.parametrize('n', [28, 100, 7])
def test_unsupported_width_names_it_and_the_block_that_would_do(n):
  with pytest.raises(ValueError, match=f'width {n} is not 2\\^k times a Hadamard order') as e:
    core.hadamard_transform(jnp.ones((2, n)))
  assert f'block={hadamard.largest_block(n)}' in str(e.value)
  assert hadamard.largest_block(100) == 20 and hadamard.largest_block(28) == 4 and hadamard.largest_block(7) == 1


def test_orders_include_minilm_widths():
  assert 12 in hadamard.ORDERS and 20 in hadamard.ORDERS
  assert all(hadamard.supported(n) for n in (384, 768, 1536, 3072, 256, 5120, 3584))  # 3584 = 224 · 16 (q = 223)
  assert not any(hadamard.supported(n) for n in (28, 100, 7, 3500))
