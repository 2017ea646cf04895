"""Held-out evaluation in training: the padded, batched, mesh-sharded path gives the plain NumPy mean NLL."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import models
from jaxcompress.train import evaluate, sharding

MODEL = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))


def test_lm_eval_equals_numpy_mean_nll_over_every_token():
  params = jax.jit(MODEL.init)(jax.random.key(0))
  rows = np.random.RandomState(1).randint(0, 64, (11, 9)).astype(np.int32)  # 11 rows: last batch padded
  fn = evaluate.make_lm_eval(MODEL, rows, batch_size=4, mesh=sharding.make_mesh(-1, 1, 1))
  got = fn(params)
  logits = np.asarray(MODEL.apply(params, jnp.asarray(rows[:, :-1])), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]
  assert got['valid/tokens'] == 11 * 8
  np.testing.assert_allclose(got['valid/loss'], nll.mean(), rtol=1e-5)
  np.testing.assert_allclose(got['valid/perplexity'], np.exp(nll.mean()), rtol=1e-5)
