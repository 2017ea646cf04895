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
  moe = moefication.moefy(mlp, 4, jax.random.key(1))
  assert moe['up'].shape == (4, 16, 8) and moe['down'].shape == (4, 8, 16)
  assert sorted(np.asarray(moe['neurons']).ravel().tolist()) == list(range(32))
  h, d = _dense(mlp, X.astype(np.float64))
  np.testing.assert_allclose(moefication.moe_mlp(X, moe, 4, 'silu'), h @ d, rtol=1e-4, atol=1e-5)


def test_top_k_matches_numpy_and_dispatch_is_exact(mlp):
  moe = moefication.moefy(mlp, 4, jax.random.key(1))
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
    moefication.moefy(mlp, 5, jax.random.key(0))
  moe = moefication.moefy(mlp, 4, jax.random.key(1))
  with pytest.raises(ValueError, match='top_k=5'):
    moefication.moe_mlp(X, moe, 5, 'silu')
