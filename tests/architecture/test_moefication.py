"""MoEfication: balanced clusters, all experts reproduce the dense MLP, top-k against NumPy, dispatch = exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import models
from jaxcompress.architecture import moefication

LLAMA = models.Llama(models.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_layers=1,
                                        num_heads=2, num_kv_heads=2))
X = np.random.RandomState(0).randn(24, 16).astype(np.float32)


@pytest.fixture(scope='module')
def mlp():
  return jax.jit(LLAMA.init)(jax.random.key(0))['layers'][0]['mlp']


def _dense(mlp, x):
  silu = lambda z: z / (1 + np.exp(-z))
  g, u, d = (np.asarray(mlp[n]['kernel'], np.float64) for n in ('gate_proj', 'up_proj', 'down_proj'))
  return silu(x @ g) * (x @ u), d


def test_experts_partition_the_neurons_and_reproduce_the_mlp(mlp):
  moe = moefication.moefy_mlp(mlp, 4, jax.random.key(1))
  assert moe['up'].shape == (4, 16, 8) and moe['down'].shape == (4, 8, 16)
  assert sorted(np.asarray(moe['neurons']).ravel().tolist()) == list(range(32))
  h, d = _dense(mlp, X.astype(np.float64))
  np.testing.assert_allclose(moefication.moe_mlp(X, moe, 4, 'silu'), h @ d, rtol=1e-4, atol=1e-5)


def test_top_k_matches_numpy_and_dispatch_is_exact(mlp):
  moe = moefication.moefy_mlp(mlp, 4, jax.random.key(1))
  h, d = _dense(mlp, X.astype(np.float64))
  scores = X.astype(np.float64) @ np.asarray(moe['router'], np.float64)
  top = np.argsort(-scores, 1)[:, :2]
  neurons = np.asarray(moe['neurons'])
  ref = np.stack([h[i, neurons[top[i]].ravel()] @ d[neurons[top[i]].ravel()] for i in range(len(X))])
  np.testing.assert_allclose(moefication.moe_mlp(X, moe, 2, 'silu'), ref, rtol=1e-4, atol=1e-5)
  y, dropped = moefication.moe_mlp_dispatch(jnp.asarray(X), moe, 2, 'silu', capacity_factor=4.0)
  assert float(dropped) == 0.0
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
  _, dropped = moefication.moe_mlp_dispatch(jnp.asarray(X), moe, 2, 'silu', capacity_factor=0.25)
  assert float(dropped) > 0  # a full expert drops its lowest-scoring tokens, and says how many


def test_bad_settings_are_named(mlp):
  with pytest.raises(ValueError, match='num_experts=5'):
    moefication.moefy_mlp(mlp, 5, jax.random.key(0))
  moe = moefication.moefy_mlp(mlp, 4, jax.random.key(1))
  with pytest.raises(ValueError, match='top_k=5'):
    moefication.moe_mlp(X, moe, 5, 'silu')


MODEL = models.Llama(models.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_layers=2,
                                        num_heads=2, num_kv_heads=2, max_position_embeddings=32))
TOKENS = np.random.RandomState(1).randint(0, 20, (2, 9)).astype(np.int32)


def test_moe_model_with_every_expert_is_the_dense_model():
  params = jax.jit(MODEL.init)(jax.random.key(2))
  spec, moe = moefication.moefy_model(MODEL, params, num_experts=4, top_k=4, key=jax.random.key(3))
  assert spec.config.moe_experts == 4 and set(moe['layers'][1]['mlp']) == {'router', 'up', 'gate', 'down'}
  dense = MODEL.apply(params, TOKENS)
  np.testing.assert_allclose(spec.apply(moe, TOKENS), dense, rtol=1e-5, atol=1e-5)
  # Top-2 in the model: each block's MLP is the NumPy top-2 sum of its experts on that block's input.
  import dataclasses
  top2 = models.Llama(dataclasses.replace(spec.config, moe_top_k=2, moe_capacity=4.0))
  out, inter = top2.apply(moe, TOKENS, intermediates=('hidden_states',))
  assert not np.allclose(out, dense, atol=1e-4)
  bp = top2.bind_block(moe['layers'][1])
  h = inter['hidden_states'][1]
  h = h + bp.attn(bp.attn_norm(h), top2.context(TOKENS))[0]
  x = np.asarray(bp.mlp_norm(h), np.float64).reshape(-1, 16)
  m = {k: np.asarray(v, np.float64) for k, v in moe['layers'][1]['mlp'].items()}
  top = np.argsort(-(x @ m['router']), 1)[:, :2]
  silu = lambda z: z / (1 + np.exp(-z))
  ref = np.stack([sum(silu(x[i] @ m['gate'][e]) * (x[i] @ m['up'][e]) @ m['down'][e] for e in top[i])
                  for i in range(len(x))])
  np.testing.assert_allclose(np.asarray(inter['hidden_states'][2]).reshape(-1, 16),
                             (np.asarray(h, np.float64).reshape(-1, 16) + ref), rtol=1e-4, atol=1e-5)
  # KV-cache decoding runs the mixture too.
  assert models.generate(top2, moe, TOKENS[:, :4], max_new_tokens=3).shape == (2, 7)
  with pytest.raises(ValueError, match='top_k=5'):
    moefication.moefy_model(MODEL, params, num_experts=4, top_k=5, key=jax.random.key(0))
  with pytest.raises(ValueError, match='already a mixture'):
    moefication.moefy_model(spec, moe, num_experts=4, top_k=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match='capacity=0'):
    models.Llama(dataclasses.replace(spec.config, moe_capacity=0.0)).init(jax.random.key(0))
  with pytest.raises(ValueError, match='moe_experts=4; a MoEfied MLP has no Hugging Face'):
    spec.hf_config()
