"""Wanda and SparseGPT on one layer against NumPy float64 implementations written from the papers, what they
must beat, and bad calibration input."""


import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, pruning
from jaxcompress.calibration import inverse_hessian
from jaxcompress.pruning._src import sparsegpt as sparsegpt_lib  # the module; pruning.sparsegpt is the method
from tests.pruning import reference as ref


def layer(seed, n_in=48, n_out=12, tokens=96, outliers=True):
  """w [in, out], x [tokens, in] with a few outlier input features (as LLM activations have)."""
  rs = np.random.RandomState(seed)
  scale = 1 + (20 * (rs.rand(n_in) < 0.1) if outliers else 0)
  x = rs.randn(tokens, n_in) * scale + 0.3 * rs.randn(tokens, 1)
  return rs.randn(n_in, n_out), x


def f32(a):
  return jnp.asarray(a, jnp.float32)


@pytest.mark.parametrize('pattern,nm', [(None, None), ('2:4', (2, 4)), ('4:8', (4, 8))])
def test_wanda_mask_is_identical_to_numpy(pattern, nm):
  w, x = layer(0)
  for sparsity in ((0.5, 0.7) if nm is None else (0.5,)):
    out = pruning.wanda_layer(f32(w), f32(x), sparsity=sparsity, pattern=pattern)
    np.testing.assert_array_equal(np.asarray(out.mask), ref.wanda(w.T, x, sparsity, nm).T)
    np.testing.assert_array_equal(np.asarray(out.value), np.asarray(f32(w)))
    # from streamed statistics: the same mask
    again = pruning.wanda_from_norms(f32(w), f32((x ** 2).sum(0)), sparsity=sparsity, pattern=pattern)
    np.testing.assert_array_equal(np.asarray(again.mask), np.asarray(out.mask))


@pytest.mark.parametrize('pattern,nm,block_size,n_in', [(None, None, 16, 48), (None, None, 32, 40),
                                                        ('2:4', (2, 4), 16, 48), ('4:8', (4, 8), 16, 48)])
def test_sparsegpt_equals_numpy_mask_and_weights(pattern, nm, block_size, n_in):
  # n_in=40, block 32: a last, partial block (selection over its 8 rows only)
  w, x = layer(1, n_in=n_in)
  for sparsity in ((0.5, 0.7) if nm is None else (0.5,)):
    out = pruning.sparsegpt_layer(f32(w), f32(x), sparsity=sparsity, pattern=pattern, block_size=block_size)
    r_w, r_keep = ref.sparsegpt(w.T, x, sparsity, nm=nm, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(out.mask), r_keep.T)
    value = np.asarray(out.value, np.float64)
    assert np.linalg.norm(value - r_w.T) / np.linalg.norm(r_w) < 1e-4
    assert (value[~np.asarray(out.mask)] == 0).all()
    assert abs(1 - np.asarray(out.mask).mean() - sparsity) < 0.01  # rounded per block


def test_inverse_cholesky_is_upper_factor_of_inverse():
  rs = np.random.RandomState(2)
  a = rs.randn(20, 12)
  h = a.T @ a + 0.1 * np.eye(12)
  u = np.asarray(inverse_hessian.inverse_cholesky_upper(f32(h)), np.float64)
  assert np.allclose(np.tril(u, -1), 0)
  np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=1e-4, atol=1e-5)


def test_wanda_and_sparsegpt_beat_magnitude_on_output_error():
  w, x = layer(3, n_in=64, n_out=32, tokens=256)
  dense = x @ w

  def err(masked):
    return np.linalg.norm(dense - x @ np.asarray(masked.materialize(), np.float64))

  for pattern in (None, '2:4'):
    mag = pruning.prune({'k': {'kernel': f32(w)}}, sparsity=0.5, pattern=pattern,
                        selection=core.Rules(include='kernel'))['k']['kernel']
    e_mag = err(mag)
    e_wanda = err(pruning.wanda_layer(f32(w), f32(x), pattern=pattern))
    e_sgpt = err(pruning.sparsegpt_layer(f32(w), f32(x), pattern=pattern, block_size=16))
    assert e_sgpt < e_wanda < e_mag, (pattern, e_sgpt, e_wanda, e_mag)
    assert e_sgpt < 0.7 * e_mag


def test_dead_inputs_are_zeroed_not_nan():
  w, x = layer(4, n_in=32)
  x[:, [3, 10]] = 0  # inputs never active: a singular XᵀX
  out = pruning.sparsegpt_layer(f32(w), f32(x), block_size=16)
  value = np.asarray(out.value)
  assert np.isfinite(value).all()
  assert (value[[3, 10]] == 0).all()
  r_w, r_keep = ref.sparsegpt(w.T, x, 0.5, block_size=16)
  np.testing.assert_array_equal(np.asarray(out.mask), r_keep.T)
  assert np.linalg.norm(value - r_w.T) / np.linalg.norm(r_w) < 1e-4
  assert np.isfinite(np.asarray(pruning.wanda_layer(f32(w), f32(x)).value)).all()


@pytest.mark.parametrize('bad', ['empty', 'nan', 'inf', 'zeros', 'width'])
def test_bad_calibration_inputs_are_refused(bad):
  w, x = layer(5, n_in=16)
  x = {'empty': x[:0], 'nan': np.where(np.arange(16) == 2, np.nan, x), 'inf': np.where(np.arange(16) == 2, np.inf, x),
       'zeros': 0 * x, 'width': x[:, :8]}[bad]
  with pytest.raises(ValueError):
    pruning.sparsegpt_layer(f32(w), f32(x))
  if bad != 'zeros':  # an all-zero input is harmless to Wanda: every score is 0, the mask is still exact
    with pytest.raises(ValueError):
      pruning.wanda_layer(f32(w), f32(x))


def test_one_compile_per_layer_shape():
  before = sparsegpt_lib._solve._cache_size()
  for seed in range(3):
    w, x = layer(10 + seed, n_in=36, n_out=7)  # a shape no other test uses
    pruning.sparsegpt_layer(f32(w), f32(x), block_size=12, sparsity=0.4 + 0.1 * seed)
  assert sparsegpt_lib._solve._cache_size() == before + 1
