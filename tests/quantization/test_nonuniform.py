"""SqueezeLLM-style non-uniform quantization: weighted k-means equal to NumPy float64; dense-and-sparse."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, quantization


def _kmeans(v, s, levels, iters):
  """NumPy float64 weighted Lloyd iterations from evenly spaced initial levels."""
  live = s > 0
  c = v[live].min() + (v[live].max() - v[live].min()) * np.arange(levels) / (levels - 1)
  for _ in range(iters):
    q = np.abs(v[:, None] - c).argmin(1)
    for j in range(levels):
      m = s[q == j].sum()
      if m > 0:
        c[j] = (s[q == j] * v[q == j]).sum() / m
  return c, np.abs(v[:, None] - c).argmin(1)


def _layer(seed, n=64, out=12):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((256, n)) * rng.lognormal(0, 1, n)
  return rng.standard_normal((n, out)), x


def test_weighted_kmeans_matches_reference_and_beats_rtn():
  w, x = _layer(0)
  sens = (x * x).sum(0)
  with jax.enable_x64(True):
    leaf = quantization.squeezellm_from_hessian(jnp.asarray(w), jnp.asarray(sens), bits=3, iters=10)
    got, book = np.asarray(leaf.materialize()), np.asarray(leaf.codebook)
  for j in range(w.shape[1]):
    c, q = _kmeans(w[:, j], sens + sens.max() * 1e-8 + 1e-30, 8, 10)
    np.testing.assert_allclose(book[j], c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got[:, j], c[q], rtol=1e-6, atol=1e-6)
  x32, w32 = x.astype(np.float32), w.astype(np.float32)
  rtn = quantization.quantize_weight(w32, bits=3, group_size=None)
  nu = quantization.squeezellm_layer(w32, x32, bits=3)
  assert quantization.layer_error(x32, w32, nu) < quantization.layer_error(x32, w32, rtn)


def test_dense_and_sparse_keeps_outliers_exact_and_round_trips(tmp_path):
  w, x = _layer(1)
  w[5, 3] = 30.0
  leaf = quantization.squeezellm_layer(w.astype(np.float32), x.astype(np.float32), bits=3,
                                       outlier_fraction=0.01)
  assert isinstance(leaf, quantization.Outliers)
  dense = np.asarray(leaf.materialize())
  assert dense[5, 3] == 30.0
  xs = jnp.asarray(x[:7], jnp.float32)
  np.testing.assert_allclose(core.linear(xs, leaf), xs @ dense, rtol=1e-4, atol=1e-3)
  core.serialize.save(tmp_path / 'n.safetensors', {'k': leaf})
  back = core.serialize.load(tmp_path / 'n.safetensors')['k']
  np.testing.assert_array_equal(back.materialize(), dense)


def test_block_by_block_squeezellm_equals_whole_model_calibration():
  """Sensitivities from run_sequential(calibrate_on='original') are `calibrate`'s: the same codebooks."""
  from jaxcompress import calibration, models
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  params = jax.jit(model.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 64, (4, 16)).astype(np.int32) for _ in range(2)]
  config = quantization.NonUniformConfig(bits=3, outlier_fraction=0.01, iters=5)
  got = core.paths.flatten(quantization.nonuniform(model, params, batches, config=config)[1])
  stats = calibration.calibrate(model, params, batches, calibration.column_norms(), head=False)
  assert len(stats) == 14
  for p, st in stats.items():
    want = quantization.squeezellm_from_hessian(core.paths.get(params, p), st['sq_norm'], bits=3,
                                                outlier_fraction=0.01, iters=5)
    assert isinstance(got[p], quantization.Outliers), p
    np.testing.assert_allclose(got[p].materialize(), want.materialize(), rtol=1e-6, atol=1e-7, err_msg=p)
  with calibration.record_sequential() as plans:
    quantization.nonuniform(model, model.abstract_params(), batches, config=config)
  assert [(p.calibrate_on, p.per_group) for p in plans] == [('original', False)]
