"""The package's one token cross-entropy (optax's), against the log-softmax it replaced and NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import eval as eval_lib
from jaxcompress.train import objectives


def _log_softmax_nll(logits, targets):
  """The former implementation: log-softmax in float32, then the target's entry."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def test_token_nll_matches_the_former_implementation_and_float64():
  rng = np.random.RandomState(0)
  logits = (8 * rng.randn(3, 5, 97)).astype(np.float32)
  targets = rng.randint(0, 97, (3, 5)).astype(np.int32)
  mask = rng.rand(3, 5) > 0.3
  got = eval_lib.token_nll(jnp.asarray(logits), jnp.asarray(targets))
  assert got.dtype == jnp.float32 and got.shape == (3, 5)
  np.testing.assert_allclose(got, _log_softmax_nll(jnp.asarray(logits), jnp.asarray(targets)), rtol=1e-6,
                             atol=1e-5)
  x = logits.astype(np.float64)
  ref = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1) - np.take_along_axis(
      x, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
  masked = eval_lib.token_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(masked)[~mask], 0.0)
  np.testing.assert_allclose(np.asarray(masked)[mask], ref[mask], rtol=1e-6, atol=1e-5)
  bf16 = eval_lib.token_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
  assert bf16.dtype == jnp.float32  # bf16 logits, float32 loss
  assert not hasattr(objectives, 'token_cross_entropy')  # the objectives use this one
