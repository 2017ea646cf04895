"""MHA -> GQA/MQA conversion: the pooling against NumPy, exactness when grouped heads agree, bad targets."""

import jax
import jax.numpy as jnp
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


BERT = models.Bert(models.BertConfig(vocab_size=30, hidden_size=24, num_layers=2, num_heads=6,
                                     intermediate_size=32, max_position_embeddings=16))


def test_encoder_groups_are_grouped_query_attention():
  """BERT 6 heads -> 2 key/value heads: pooled like NumPy, and the expanded model equals a float64 GQA
  attention of the grouped heads (query head n reads key/value head n // 3)."""
  p = jax.jit(BERT.init)(jax.random.key(1))
  grouped = architecture.group_kv_heads(BERT, p, 2)
  k = np.asarray(p['layers'][0]['attn']['k_proj']['kernel'], np.float64).reshape(24, 6, 4)
  np.testing.assert_allclose(grouped['layers'][0]['attn']['k_proj']['kernel'],
                             k.reshape(24, 2, 3, 4).mean(2).reshape(24, 8), rtol=1e-6, atol=1e-7)
  run = architecture.expand_kv_heads(BERT, grouped, 2)
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 5, 24)))
  ctx = BERT.context(jnp.zeros((2, 5), jnp.int32))
  out = BERT.bind_block(run['layers'][0]).attn(jnp.asarray(x), ctx)
  out = out[0] if isinstance(out, tuple) else out
  a = {n: {kk: np.asarray(v, np.float64) for kk, v in grouped['layers'][0]['attn'][n].items()}
       for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')}
  lin = lambda n: x @ a[n]['kernel'] + a[n]['bias']
  q, kk, v = lin('q_proj').reshape(2, 5, 6, 4), lin('k_proj').reshape(2, 5, 2, 4), lin('v_proj').reshape(2, 5, 2, 4)
  s = np.einsum('bqnh,bknh->bnqk', q, kk[:, :, np.arange(6) // 3]) / 2.0
  pr = np.exp(s - s.max(-1, keepdims=True))
  pr /= pr.sum(-1, keepdims=True)
  o = np.einsum('bnqk,bknh->bqnh', pr, v[:, :, np.arange(6) // 3]).reshape(2, 5, 24)
  np.testing.assert_allclose(out, o @ a['o_proj']['kernel'] + a['o_proj']['bias'], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match=r'kv_heads=4 does not divide the 6 attention heads.*\[1, 2, 3, 6\]'):
    architecture.group_kv_heads(BERT, p, 4)
  with pytest.raises(ValueError, match='already has 2 key/value heads'):
    architecture.group_kv_heads(MHA.__class__(MHA.config.__class__(**{**MHA.config.__dict__, 'num_kv_heads': 2})),
                                {}, 1)
