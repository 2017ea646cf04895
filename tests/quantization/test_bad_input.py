"""Bad input gets a clear error naming the parameter, and degenerate input (zero / constant) stays finite."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, quantization

RNG = np.random.default_rng(0)
W = RNG.standard_normal((32, 8)).astype(np.float32)
X = RNG.standard_normal((64, 32)).astype(np.float32)


def _layers(bits=4, group_size=16):
  return {
      'gptq_layer': lambda w, x: quantization.gptq_layer(w, x, bits=bits, group_size=group_size),
      'awq_layer': lambda w, x: quantization.awq_layer(w, x, quantization.AWQConfig(bits=bits,
                                                                                    group_size=group_size)),
      'squeezellm_layer': lambda w, x: quantization.squeezellm_layer(w, x, bits=bits),
  }


def test_core_quantize_names_group_size_and_the_fix():
  with pytest.raises(ValueError, match=r'quantize: group_size=64 does not divide the input dimension 32.*'
                                       r'group_size=None'):
    core.quantize(jnp.ones((32, 8)), group_size=64)
  with pytest.raises(ValueError, match='bits=9'):
    core.quantize(jnp.ones((32, 8)), bits=9)


@pytest.mark.parametrize('name', ['gptq_layer', 'awq_layer'])
@pytest.mark.parametrize('bits', [9, 4.0])
def test_unsupported_bits(name, bits):
  with pytest.raises(ValueError, match=f'bits={bits!r}'):
    _layers(bits=bits)[name](W, X)


@pytest.mark.parametrize('name', ['gptq_layer', 'awq_layer'])
def test_group_size_not_dividing_in(name):
  with pytest.raises(ValueError, match='group_size=12 does not divide the input dimension 32'):
    _layers(group_size=12)[name](W, X)


@pytest.mark.parametrize('name', ['gptq_layer', 'awq_layer', 'squeezellm_layer'])
@pytest.mark.parametrize('where,bad', [('w', np.nan), ('x', np.inf)])
def test_nan_or_inf_is_refused(name, where, bad):
  w, x = W.copy(), X.copy()
  (w if where == 'w' else x)[3, 2] = bad
  with pytest.raises(ValueError, match='NaN/inf'):
    _layers()[name](w, x)


def test_w8a8_refuses_nan():
  w = W.copy()
  w[0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN/inf'):
    quantization.w8a8_layer(w)
  with pytest.raises(ValueError, match='NaN/inf'):
    quantization.w8a8_layer(W, x_absmax=np.full(32, np.inf, np.float32), alpha=0.5)


@pytest.mark.parametrize('name', ['gptq_layer', 'awq_layer', 'squeezellm_layer'])
def test_zero_and_constant_weights_and_inputs_stay_finite(name):
  w = W.copy()
  w[:, 0] = 0.0  # an all-zero output column
  w[:16, 1] = 0.25  # a constant group
  x = X.copy()
  x[:, 5] = 0.0  # a dead input feature
  for xi in (x, np.zeros_like(X)):  # all-zero calibration data: nothing to weight errors by
    if name == 'gptq_layer' and not xi.any():  # a zero Hessian has no inverse: refused, as SparseGPT does
      with pytest.raises(ValueError, match='Hessian is zero'):
        _layers()[name](w, xi)
      continue
    got = np.asarray(core.materialize(_layers()[name](w, xi)))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:, 0], 0.0)
  y = core.linear(jnp.asarray(x), quantization.w8a8_layer(w, x_absmax=np.abs(x).max(0), alpha=0.5))
  assert np.isfinite(np.asarray(y)).all()
