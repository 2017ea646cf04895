"""Product quantization: k-means equal to NumPy float64; the table-lookup matmul equals x @ W."""


import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, quantization
from jaxcompress.quantization._src import pq as pq_lib  # the package's `pq` is the method


def test_product_quantization_matches_reference_and_multiplies_without_w(tmp_path):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((16, 40))
  key = jax.random.key(3)
  with jax.enable_x64(True):
    leaf = quantization.product_quantize(jnp.asarray(w), key, d=4, bits=3, iters=8)
    picks = pq_lib.initial_picks(key, 4, 40, 3)
    got = np.asarray(leaf.materialize())
  want = np.zeros_like(w)
  for j in range(4):
    v = w[4 * j:4 * j + 4].T  # [out, d]
    c = v[picks[j]].copy()
    for _ in range(8):
      q = ((v[:, None] - c[None]) ** 2).sum(-1).argmin(1)
      for t in range(8):
        if (q == t).any():
          c[t] = v[q == t].mean(0)
    q = ((v[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    want[4 * j:4 * j + 4] = c[q].T
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
  x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  leaf32 = quantization.product_quantize(jnp.asarray(w, jnp.float32), key, d=4, bits=3)
  np.testing.assert_allclose(core.linear(x, leaf32), x @ leaf32.materialize(), rtol=1e-5, atol=1e-5)
  core.serialize.save(tmp_path / 'p.safetensors', {'k': leaf32})
  np.testing.assert_array_equal(core.serialize.load(tmp_path / 'p.safetensors')['k'].materialize(),
                                leaf32.materialize())
