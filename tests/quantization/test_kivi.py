"""KIVI's quantized KV cache: the cache against a float64 NumPy reference of the paper's equations, `generate` with
it, the `kivi` recipe stage, save/load, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import models, quantization, recipes
from jaxcompress.models import decode
from jaxcompress.models.decode import KVCacheFormat, QuantizedKV

LLAMA = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=64))
PROMPT = jnp.asarray(np.random.RandomState(0).randint(0, 64, (3, 7)), jnp.int32)


def _scaled(params):
  # Larger weights make the greedy choices well separated, so float rounding cannot flip them.
  return jax.tree.map(lambda x: x * 8 if x.ndim == 2 else x, params)


def _grid(x, axis, bits):
  """KIVI's asymmetric min-max quantize-dequantize of x over `axis`, float64; the scale and minimum are stored
  in float16 (as the authors' code and the cache store them) and the codes taken on that stored grid."""
  lo, hi = x.min(axis=axis, keepdims=True), x.max(axis=axis, keepdims=True)
  qmax = 2 ** bits - 1
  s = ((hi - lo) / qmax).astype(np.float16).astype(np.float64)
  z = lo.astype(np.float16).astype(np.float64)
  q = np.clip(np.round((x - z) / np.where(s > 0, s, 1.0)), 0, qmax)
  return q * s + z


def kivi_reference(k, v, n, fmt):
  """k, v: [B, >= n, K, H] -> what a KIVI cache holding n tokens reads back, float64 [B, n, K, H].

  Keys: the first n // C * C tokens (C = max(R, G)) quantized per channel in groups of G tokens, the rest exact.
  Values: the first max(n - R, 0) tokens quantized per token in groups of G channels, the last R exact."""
  k, v = np.asarray(k, np.float64)[:, :n].copy(), np.asarray(v, np.float64)[:, :n].copy()
  b, _, kv, h = k.shape
  g, c = fmt.group_size, max(fmt.residual, fmt.group_size)
  qk, qv = n // c * c, max(n - fmt.residual, 0)
  k[:, :qk] = _grid(k[:, :qk].reshape(b, qk // g, g, kv, h), 2, fmt.bits).reshape(b, qk, kv, h)
  v[:, :qv] = _grid(v[:, :qv].reshape(b, qv, kv, h // g, g), 4, fmt.bits).reshape(b, qv, kv, h)
  return k, v


@pytest.mark.parametrize('bits,residual', [(8, 16), (4, 16), (2, 16), (4, 0)])
def test_cache_equals_float64_reference_step_by_step(bits, residual):
  fmt = KVCacheFormat(bits=bits, group_size=8, residual=residual)
  b, length, kv, h = 2, 45, 2, 16
  rs = np.random.RandomState(bits + residual)
  k_all = rs.randn(b, length, kv, h).astype(np.float32)
  k_all[..., 3] *= 20  # an outlier channel, as keys have
  v_all = rs.randn(b, length, kv, h).astype(np.float32)
  cache = QuantizedKV.zeros(fmt, b, length, kv, h, jnp.float32)

  @jax.jit
  def write(cache, k, v, n):  # what forward_cached does around the blocks: view, write the new slots, store
    view = cache.view(n)
    view = {'k': jax.lax.dynamic_update_slice_in_dim(view['k'], k, n, 1),
            'v': jax.lax.dynamic_update_slice_in_dim(view['v'], v, n, 1)}
    return cache.store(view, n, n + k.shape[1]), view

  n = 11  # a prefill, then one token per step
  cache, _ = write(cache, k_all[:, :n], v_all[:, :n], jnp.int32(0))
  while n < length:
    cache, seen = write(cache, k_all[:, n:n + 1], v_all[:, n:n + 1], jnp.int32(n))
    # what this step attended to: n tokens as the cache held them, plus the new one exact
    ref_k, ref_v = kivi_reference(k_all, v_all, n, fmt)
    np.testing.assert_allclose(np.asarray(seen['k'])[:, :n], ref_k, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(seen['v'])[:, :n], ref_v, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(seen['k'])[:, n], k_all[:, n])
    n += 1
  view = cache.view(jnp.int32(n))
  ref_k, ref_v = kivi_reference(k_all, v_all, n, fmt)
  np.testing.assert_allclose(np.asarray(view['k'])[:, :n], ref_k, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(view['v'])[:, :n], ref_v, rtol=0, atol=1e-5)
  # the reference quantizes: its error is that of `bits` codes (the test can fail)
  step = 6.0 / (2 ** bits - 1)
  assert 0.02 * step < np.abs(ref_v - v_all[:, :n]).max() <= step


def test_cache_bytes_count_codes_scales_and_window():
  params = LLAMA.init(jax.random.key(0))
  fmt = KVCacheFormat(bits=4, group_size=8, residual=16)
  full = decode.cache_bytes(decode.init_cache(LLAMA, params, 1, 64))
  quant = decode.cache_bytes(decode.init_cache(LLAMA, params, 1, 64, kv_cache=fmt))
  per_layer_head = {  # bytes per layer and key/value head (head_dim 8, 64 slots)
      'codes': 2 * 64 * 8 // 2, 'key scale+min': 2 * (64 // 8) * 8 * 2, 'value scale+min': 2 * 64 * (8 // 8) * 2,
      'windows': (16 + 16) * 8 * 4}
  assert full == 2 * 2 * 2 * 64 * 8 * 4
  assert quant == 2 * 2 * sum(per_layer_head.values())


def test_default_generation_is_unchanged():
  params = _scaled(LLAMA.init(jax.random.key(1)))
  # the tokens of this program before the quantized cache existed
  greedy = [[33, 23, 22, 14, 53, 22, 23, 22, 51, 53], [51, 44, 44, 44, 44, 44, 44, 44, 44, 44],
            [41, 55, 55, 55, 55, 55, 9, 21, 21, 21]]
  sampled = [[38, 33, 0, 17, 15, 22, 33, 61, 24, 30], [23, 58, 16, 25, 21, 44, 48, 51, 28, 7],
             [4, 30, 58, 58, 3, 5, 55, 61, 55, 55]]
  np.testing.assert_array_equal(models.generate(LLAMA, params, PROMPT, max_new_tokens=10)[:, 7:], greedy)
  out = models.generate(LLAMA, params, PROMPT, max_new_tokens=10, temperature=1.0, key=jax.random.key(5))
  np.testing.assert_array_equal(out[:, 7:], sampled)
  assert isinstance(decode.init_cache(LLAMA, params, 1, 8)[0], dict)


def _generate(fmt):
  params = _scaled(LLAMA.init(jax.random.key(1)))
  return np.asarray(models.generate(LLAMA, params, PROMPT, max_new_tokens=10, kv_cache=fmt))


def test_window_longer_than_the_text_decodes_as_full_precision():
  # nothing leaves the window, so nothing is quantized: the tokens are those of the full-precision cache
  np.testing.assert_array_equal(_generate(KVCacheFormat(bits=2, group_size=8, residual=24)), _generate(None))


def test_int2_without_window_changes_the_text():
  assert not np.array_equal(_generate(KVCacheFormat(bits=2, group_size=8, residual=0)), _generate(None))


def test_kivi_stage_sets_the_default_cache_and_survives_save_load(tmp_path):
  params = _scaled(LLAMA.init(jax.random.key(1)))
  fmt = KVCacheFormat(bits=2, group_size=8, residual=0)
  model, same = recipes.run(recipes.parse('kivi(bits=2, group_size=8, residual=0)'), recipes.Context(), LLAMA, params)
  assert model.config.kv_cache == fmt
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, same, params)))  # the weights are untouched
  by_stage = models.generate(model, params, PROMPT, max_new_tokens=10)
  np.testing.assert_array_equal(by_stage, models.generate(LLAMA, params, PROMPT, max_new_tokens=10, kv_cache=fmt))
  np.testing.assert_array_equal(models.generate(model, params, PROMPT, max_new_tokens=10, kv_cache='full'),
                                models.generate(LLAMA, params, PROMPT, max_new_tokens=10))
  recipes.model_dirs.save_compressed(tmp_path, model, params)
  loaded, _, kind = recipes.model_dirs.load(tmp_path)
  assert kind == 'compressed' and loaded.config.kv_cache == fmt


def test_bad_input():
  for kwargs, message in (({'bits': 3}, r'bits=3 is not supported; use one of \(8, 4, 2\)'),
                          ({'group_size': 0}, 'group_size=0 must be a positive int'),
                          ({'residual': -1}, r'residual=-1 must be an int >= 0'),
                          ({'group_size': 8, 'residual': 12}, r'residual=12 is not a multiple of group_size=8 \(.*\); '
                                                              'use residual=8 or 16')):
    with pytest.raises(ValueError, match=message):
      KVCacheFormat(**kwargs)
  params = LLAMA.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r'group_size=16 does not divide head_dim=8 .*choose one of \[1, 2, 4, 8\]'):
    models.generate(LLAMA, params, PROMPT, max_new_tokens=2, kv_cache=KVCacheFormat(group_size=16, residual=0))
  with pytest.raises(ValueError, match="kv_cache='int4': give a models.decode.KVCacheFormat"):
    models.generate(LLAMA, params, PROMPT, max_new_tokens=2, kv_cache='int4')
  with pytest.raises(ValueError, match='bits=3 is not supported'):
    recipes.parse('kivi(bits=3)')
  with pytest.raises(ValueError, match='kivi: Llama: kv_cache: group_size=32 does not divide head_dim=8'):
    quantization.kivi(LLAMA, params, None)
  bert = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                       intermediate_size=48))
  with pytest.raises(ValueError, match='kivi: Bert is an encoder'):
    quantization.kivi(bert, None, None)
