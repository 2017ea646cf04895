"""Mixed precision: the size budget holds and sensitive layers get the bits."""

import jax
import pytest

from jaxcompress import core, quantization
from tests.quantization.test_awq import LLAMA, _batches


def test_allocate_respects_budget_and_favours_sensitive_layers():
  errors = {'a': {2: 100.0, 4: 1.0, 8: 0.0}, 'b': {2: 1.0, 4: 0.5, 8: 0.0}, 'c': {2: 50.0, 4: 2.0, 8: 0.1}}
  sizes = {'a': 100, 'b': 100, 'c': 200}
  bits = quantization.allocate(errors, sizes, 3.5)
  assert sum(bits[p] * sizes[p] for p in bits) <= 3.5 * 400
  assert bits == {'a': 4, 'b': 2, 'c': 4}
  with pytest.raises(ValueError, match='average_bits=1.5 is below 2.000'):
    quantization.allocate(errors, sizes, 1.5)


@pytest.mark.slow
def test_mixed_precision_model_meets_the_average():
  params = jax.jit(LLAMA.init)(jax.random.key(0))
  config = quantization.MixedConfig(average_bits=3.5, candidates=(3, 4), group_size=16)
  bits = quantization.bit_allocation(LLAMA, params, _batches(), config=config)
  _, q = quantization.mixed(LLAMA, params, _batches(), config=config)
  flat = core.flatten(q)
  sizes = {p: core.paths.get(params, p).size for p in bits}
  assert sum(bits[p] * sizes[p] for p in bits) / sum(sizes.values()) <= 3.5
  assert set(bits.values()) == {3, 4}
  assert all(flat[p].bits == b for p, b in bits.items())
