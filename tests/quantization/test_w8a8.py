"""W8A8: int8 x int8 -> int32 matmul against NumPy float64; SmoothQuant and LLM.int8() beat naive W8A8."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models, quantization
from jaxcompress.quantization._src import w8a8 as w8a8_lib  # the package's `w8a8` is the function
from tests.quantization.test_awq import LLAMA, _batches, _logit_error, _salient


def _acts(seed, tokens=64, n=32):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, n))
  x[:, [3, 17]] *= 40.0  # outlier features, as LLM activations have
  return x.astype(np.float32)


def _ref(x, w, s=None, outliers=()):
  """NumPy float64 W8A8 from the papers: smoothing, per-token / per-channel symmetric int8, float outliers."""
  x = x.astype(np.float64)
  w = w.astype(np.float64)
  if s is not None:
    x, w = x / s, w * s[:, None]
  y = np.zeros((x.shape[0], w.shape[1]))
  if len(outliers):
    y += x[:, outliers] @ w[outliers]
    x = x.copy()
    w = w.copy()
    x[:, outliers] = 0
    w[outliers] = 0
  sx = np.abs(x).max(1, keepdims=True) / 127
  sw = np.abs(w).max(0) / 127
  xq, wq = np.round(x / sx), np.round(w / sw)
  return y + (xq @ wq) * sx * sw


def test_int8_linear_matches_reference_and_runs_an_int32_dot():
  x = _acts(0)
  w = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
  leaf = quantization.w8a8_layer(w)
  np.testing.assert_allclose(core.linear(jnp.asarray(x), leaf), _ref(x, w), rtol=1e-5, atol=1e-4)
  hlo = jax.jit(leaf.matmul).lower(jnp.asarray(x)).as_text()
  dots = [l for l in hlo.splitlines() if 'dot_general' in l]
  assert dots and all('xi8>' in l and 'xi32>' in l for l in dots), dots  # int8 x int8 -> int32


def test_smoothquant_and_llm_int8_match_reference_and_beat_naive():
  x = _acts(2)
  w = np.random.default_rng(3).standard_normal((32, 16)).astype(np.float32)
  amax = np.abs(x).max(0)
  smooth = quantization.w8a8_layer(w, x_absmax=amax, alpha=0.5)
  s = amax.astype(np.float64) ** 0.5 / np.abs(w.astype(np.float64)).max(1) ** 0.5
  np.testing.assert_allclose(core.linear(jnp.asarray(x), smooth), _ref(x, w, s), rtol=1e-4, atol=1e-3)
  mixed = quantization.w8a8_layer(w, x_absmax=amax, outlier_threshold=6.0)
  assert mixed.outliers.tolist() == [3, 17]
  np.testing.assert_allclose(core.linear(jnp.asarray(x), mixed), _ref(x, w, None, [3, 17]), rtol=1e-4, atol=1e-3)
  y = x @ w
  err = lambda leaf: np.linalg.norm(np.asarray(core.linear(jnp.asarray(x), leaf)) - y) / np.linalg.norm(y)
  naive = quantization.w8a8_layer(w)
  assert err(smooth) < 0.5 * err(naive) and err(mixed) < 0.5 * err(naive)


def test_zero_tokens_and_serialization(tmp_path):
  x = np.zeros((3, 32), np.float32)
  w = np.random.default_rng(4).standard_normal((32, 16)).astype(np.float32)
  w[:, 2] = 0.0
  amax = np.abs(_acts(5)).max(0)
  leaf = quantization.w8a8_layer(w, x_absmax=amax, alpha=0.5, outlier_threshold=6.0)
  np.testing.assert_array_equal(core.linear(jnp.asarray(x), leaf), 0.0)
  core.serialize.save(tmp_path / 'w.safetensors', {'k': leaf})
  back = core.serialize.load(tmp_path / 'w.safetensors')['k']
  for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='x_absmax'):
    quantization.w8a8_layer(w, alpha=0.5)
  bad = amax.copy()
  bad[0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    quantization.w8a8_layer(w, x_absmax=bad, alpha=0.5)


def test_model_smoothquant_folds_into_norms_and_beats_naive():
  params = _salient(jax.jit(LLAMA.init)(jax.random.key(0)))
  tokens = jnp.asarray(_batches()[0])
  _, naive = quantization.w8a8(LLAMA, params, _batches(), config=quantization.W8A8Config(migration=None))
  _, smooth = quantization.w8a8(LLAMA, params, _batches(), config=quantization.W8A8Config(migration=0.5))
  assert core.paths.get(smooth, 'layers/0/attn/q_proj/kernel').inv_smooth is None  # folded into attn_norm
  assert core.paths.get(smooth, 'layers/0/mlp/down_proj/kernel').inv_smooth is not None
  assert _logit_error(smooth, params, tokens) < _logit_error(naive, params, tokens)


def test_post_norm_bert_smoothquant_keeps_the_residual():
  """BERT's attn_norm output is also the MLP's residual: SmoothQuant must not fold 1/s into that norm."""
  bert = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                       intermediate_size=64, max_position_embeddings=32, pooler=False))
  params = jax.jit(bert.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  ups = {'layers/0/attn_norm/scale': jnp.asarray(rng.lognormal(0, 1, 32), jnp.float32)}
  params = core.paths.replace(params, ups)
  tokens = rng.integers(1, 64, (4, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  _, q = quantization.w8a8(bert, params, [{'tokens': tokens, 'attention_mask': mask}],
                           config=quantization.W8A8Config(migration=0.5))
  a = bert.sentence_embedding(params, jnp.asarray(tokens), jnp.asarray(mask))
  b = bert.sentence_embedding(q, jnp.asarray(tokens), jnp.asarray(mask))
  assert float(jnp.min(jnp.sum(a * b, -1))) > 0.99
  np.testing.assert_array_equal(q['layers'][0]['attn_norm']['scale'], params['layers'][0]['attn_norm']['scale'])


def _calibrate_then_quantize(model, params, batches, config):
  """The model-level W8A8 as it was first built: `calibrate` the whole model, then every group of every block."""
  from jaxcompress import calibration
  stats = calibration.calibrate(model, params, batches, calibration.abs_max(), head=False)
  updates = {}
  for i in range(model.num_layers(params)):
    block, prefix = model.block_params(params, i), f'{model.block_path}/{i}'
    for group in model.block_structure(block):
      amax = stats[f'{prefix}/{group.kernels[0]}']['abs_max']
      ws = [jnp.asarray(core.paths.get(block, k)) for k in group.kernels]
      fold = group.norm is not None and config.migration is not None
      if fold:
        s = w8a8_lib.smooth_scales(amax, jnp.concatenate(ws, axis=1), config.migration)
        for name in ('scale', 'bias'):
          v = core.paths.flatten(block).get(f'{group.norm}/{name}')
          if v is not None:
            updates[f'{prefix}/{group.norm}/{name}'] = jnp.asarray(v) / s
        ws, amax = [w * s[:, None] for w in ws], amax / s
      for k, w in zip(group.kernels, ws):
        updates[f'{prefix}/{k}'] = quantization.w8a8_layer(w, x_absmax=amax, alpha=None if fold else config.migration,
                                                           outlier_threshold=config.outlier_threshold)
  return core.paths.replace(params, updates)


@pytest.mark.parametrize('alpha,threshold', [(0.5, None), (None, None), (None, 6.0)])
def test_block_by_block_w8a8_equals_whole_model_calibration(alpha, threshold):
  """run_sequential(calibrate_on='original') sees the statistics `calibrate` gives: SmoothQuant, naive W8A8 and
  LLM.int8() give the leaves of calibrate-then-quantize."""
  from jaxcompress import calibration
  params = _salient(jax.jit(LLAMA.init)(jax.random.key(0)))
  config = quantization.W8A8Config(migration=alpha, outlier_threshold=threshold)
  got = core.paths.flatten(quantization.w8a8(LLAMA, params, _batches(), config=config)[1])
  want = core.paths.flatten(_calibrate_then_quantize(LLAMA, params, _batches(), config))
  assert list(got) == list(want)
  for p in want:
    assert type(got[p]) is type(want[p]), p
    for a, b in zip(jax.tree.leaves(got[p]), jax.tree.leaves(want[p])):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-7,
                                 err_msg=p)
  if threshold is not None:
    assert any(isinstance(w, quantization.Int8Linear) and w.outliers is not None for w in got.values())
  with calibration.record_sequential() as plans:  # so it runs out of core: one block-wise plan, original inputs
    quantization.w8a8(LLAMA, LLAMA.abstract_params(), _batches(), config=config)
  assert [(p.calibrate_on, p.per_group) for p in plans] == [('original', False)]
