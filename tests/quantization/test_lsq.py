"""LSQ: the step-size gradient is the paper's; finalize gives Quantized leaves with the same forward."""

import pytest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress import core, quantization
from tests.quantization.test_awq import LLAMA, _batches


def test_lsq_gradients_match_the_paper():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((16, 6)).astype(np.float32)
  c = rng.standard_normal((16, 6)).astype(np.float32)
  leaf = quantization.LSQWeight(jnp.asarray(w), jnp.log(jnp.full((1, 6), 0.3, jnp.float32)), bits=3)
  gw = jax.grad(lambda lf: jnp.sum(jnp.asarray(c) * lf.materialize()))(leaf).w
  gl = jax.grad(lambda ls: jnp.sum(jnp.asarray(c) * quantization.LSQWeight(jnp.asarray(w), ls, bits=3).materialize())
                )(leaf.log_step)
  s, qn, qp = 0.3, 4, 3
  v = w.astype(np.float64) / s
  inside = (v >= -qn) & (v <= qp)
  dv = np.where(inside, np.round(v) - v, np.clip(v, -qn, qp))  # d ŵ / d s
  g = 1 / np.sqrt(16 * qp)
  np.testing.assert_allclose(gl, (c * dv).sum(0, keepdims=True) * s * g, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, np.where(inside, c, 0.0), rtol=1e-6)


@pytest.mark.slow
def test_lsq_trains_steps_and_finalizes_to_identical_quantized_forward():
  params = jax.jit(LLAMA.init)(jax.random.key(0))
  q = quantization.add_lsq(params, bits=4)
  tokens = jnp.asarray(_batches()[0])
  loss = lambda p: jnp.mean(LLAMA.apply(p, tokens[:, :-1]) ** 2)
  opt = optax.adam(1e-2)
  state = opt.init(q)
  before = core.paths.get(q, 'layers/0/mlp/up_proj/kernel').log_step
  g = jax.jit(jax.grad(loss))(q)
  upd, state = opt.update(g, state, q)
  q = optax.apply_updates(q, upd)
  assert not np.allclose(core.paths.get(q, 'layers/0/mlp/up_proj/kernel').log_step, before)
  final = quantization.finalize_lsq(q)
  assert isinstance(core.paths.get(final, 'layers/0/mlp/up_proj/kernel'), core.Quantized)
  np.testing.assert_array_equal(LLAMA.apply(final, tokens), LLAMA.apply(q, tokens))
