"""MHA -> GQA/MQA conversion: the pooling against NumPy, exactness when grouped heads agree, bad targets."""

import jax
import numpy as np
import pytest

from jaxcompress import architecture, models

MHA = models.Llama(models.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2,
                                      num_heads=4, num_kv_heads=4, max_position_embeddings=32, qkv_bias=True))
TOKENS = np.random.RandomState(0).randint(0, 40, (2, 9)).astype(np.int32)


@pytest.fixture(scope='module')
def params():
  p = jax.jit(MHA.init)(jax.random.key(0))
  return jax.tree.map(lambda x: x + 0.01 * np.arange(x.size, dtype=np.float32).reshape(x.shape) % 0.3, p)


@pytest.mark.parametrize('target', [2, 1])
def test_pooling_matches_numpy(params, target):
  model, pooled = architecture.convert_to_gqa(MHA, params, target)
  assert model.config.num_kv_heads == target
  for name in ('k_proj', 'v_proj'):
    for leaf in ('kernel', 'bias'):
      w = np.asarray(params['layers'][1]['attn'][name][leaf], np.float64)
      w = w.reshape(*w.shape[:-1], 4, 8)
      ref = np.stack([w[..., g * (4 // target):(g + 1) * (4 // target), :].mean(-2) for g in range(target)], -2)
      np.testing.assert_allclose(pooled['layers'][1]['attn'][name][leaf], ref.reshape(*ref.shape[:-2], -1),
                                 rtol=1e-6, atol=1e-7)
  assert model.apply(pooled, TOKENS).shape == (2, 9, 40)
  assert architecture.kv_cache_bytes(model, pooled, 1, 16) * 4 == architecture.kv_cache_bytes(
      MHA, params, 1, 16) * target


def test_identical_heads_in_a_group_convert_exactly(params):
  """When the heads a group pools are equal, GQA reads exactly what MHA read: same logits."""
  p = jax.tree.map(lambda x: x, params)
  for i in (0, 1):
    for name in ('k_proj', 'v_proj'):
      for leaf in ('kernel', 'bias'):
        w = np.asarray(p['layers'][i]['attn'][name][leaf]).reshape(-1, 4, 8)
        w = np.repeat(w[:, ::2], 2, axis=1)  # heads (0, 1) and (2, 3) equal
        p['layers'][i]['attn'][name][leaf] = w.reshape(p['layers'][i]['attn'][name][leaf].shape)
  model, pooled = architecture.convert_to_gqa(MHA, p, 2)
  np.testing.assert_allclose(model.apply(pooled, TOKENS), MHA.apply(p, TOKENS), rtol=1e-5, atol=1e-5)


def test_bad_targets_are_named(params):
  with pytest.raises(ValueError, match=r'kv_heads=3 does not divide the 4 key/value heads.*\[1, 2, 4\]'):
    architecture.convert_to_gqa(MHA, params, 3)
  with pytest.raises(ValueError, match='kv_heads=0'):
    architecture.convert_to_gqa(MHA, params, 0)
  bert = models.Bert(models.BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                                       intermediate_size=8))
  with pytest.raises(ValueError, match='no num_kv_heads'):
    architecture.convert_to_gqa(bert, {}, 1)
