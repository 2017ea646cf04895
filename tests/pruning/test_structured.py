"""Structured pruning (Kwon et al. 2022) against float64 references on tiny random models."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from jaxcompress import models
from jaxcompress.pruning._src import structured  # the module; pruning.structured is the method


@functools.cache
def _llama():
  cfg = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_bias=True, qkv_bias=True, o_bias=True)
  model = models.Llama(cfg)
  return model, jax.jit(model.init)(jax.random.key(0))


@functools.cache
def _bert():
  cfg = models.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=24,
                          max_position_embeddings=16, pooler=False)
  model = models.Bert(cfg)
  params = jax.jit(model.init)(jax.random.key(1))
  # Nonzero biases, so that a bias that is sliced or kept wrongly changes the output.
  rng = np.random.default_rng(1)
  return model, jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32)),
                             params)


def _batches(model, n=2, b=3, t=6):
  rng = np.random.default_rng(7)
  mask = np.ones((b, t), np.int32)
  mask[0, -2:] = 0
  return [{'tokens': jnp.asarray(rng.integers(0, model.config.vocab_size, (b, t)), jnp.int32),
           'attention_mask': jnp.asarray(mask)} for _ in range(n)]


def _loss(model):
  def loss(params, batch, key):  # per-example projection of the output on fixed directions: nonzero gradients
    del key
    y = model.apply(params, batch['tokens'], attention_mask=batch['attention_mask'])
    z = jnp.sin(jnp.arange(y[0].size, dtype=y.dtype) * 0.7).reshape(y.shape[1:])
    m = batch['attention_mask'][..., None].astype(y.dtype)
    return jnp.sum(y * z * m, axis=(1, 2))
  return loss


def _keep(model, params, seed=3):
  u = structured.units(model, params)
  rng = np.random.default_rng(seed)
  heads = [rng.random(n) < 0.5 for n in u.heads]
  neurons = [rng.random(n) < 0.6 for n in u.neurons]
  heads[0][:] = False  # a layer with no attention left
  heads[-1][0], heads[-1][-1] = True, False  # and one with some
  return structured.Keep(tuple(heads), tuple(neurons))


@pytest.mark.parametrize('make', [_llama, _bert])
def test_sliced_equals_masked(make, tmp_path):
  model, params = make()
  keep = _keep(model, params)
  batch = _batches(model, n=1)[0]
  masked = structured.apply_masks(model, params, *structured.keep_masks(keep))
  small_model, small = structured.slice_units(model, params, keep)
  u = structured.units(small_model, small)
  assert list(u.heads) == [int(k.sum()) for k in keep.heads] and list(u.neurons) == [int(k.sum()) for k in keep.neurons]
  run = jax.jit(model.apply)
  want = run(masked, batch['tokens'], attention_mask=batch['attention_mask'])
  got = run(small, batch['tokens'], attention_mask=batch['attention_mask'])
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  # and the padded export is the same function again, at the dense shapes
  padded = structured.pad_to_dense(small_model, small, keep)
  assert jax.tree.map(jnp.shape, padded) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(run(padded, batch['tokens'], attention_mask=batch['attention_mask']), want,
                             atol=1e-6, rtol=1e-6)
  # saved with its per-layer widths and loaded back: the same numbers
  structured.save(tmp_path / 'm', small_model, small)
  loaded_model, loaded = structured.load(tmp_path / 'm')
  assert loaded_model == small_model
  np.testing.assert_array_equal(run(loaded, batch['tokens'], attention_mask=batch['attention_mask']), got)


def test_fisher_matches_finite_differences():
  """Σ_examples (∂loss/∂m)² with each gradient by central differences in float64 on the masks (grouped-query
  Llama with biases; BERT's masks go through the same apply_masks)."""
  model, params = _llama()
  batches = _batches(model)
  loss = _loss(model)
  hf, nf = structured.fisher(model, params, batches, loss)
  params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  with jax.enable_x64():
    p64 = jax.tree.map(jnp.asarray, params64)
    ones_h, ones_n = structured.ones_masks(model, params)
    ones = [jnp.asarray(x, jnp.float64) for x in ones_h + ones_n]
    per_example = jax.jit(lambda ms, batch: loss(structured.apply_masks(model, p64, ms[:2], ms[2:]), batch, None))

    def derivative(i, j, batch, eps):
      at = lambda d: np.asarray(per_example([m.at[j].add(d) if k == i else m for k, m in enumerate(ones)], batch))
      return (at(eps) - at(-eps)) / (2 * eps)

    for i, got in ((0, hf[0]), (1, hf[1]), (2, nf[0]), (3, nf[1])):
      for j in (0, 1):
        # Richardson extrapolation of central differences: O(eps⁴) truncation. The models keep float32
        # internals (norm statistics, softmax), so the differences carry ~1e-3 relative noise.
        total = sum(np.sum(((4 * derivative(i, j, b, 1e-2) - derivative(i, j, b, 2e-2)) / 3) ** 2) for b in batches)
        np.testing.assert_allclose(got[j], total, rtol=5e-3, atol=1e-4 * max(float(np.max(f)) for f in hf + nf))


def test_search_is_the_best_split_under_the_budget():
  model, params = _llama()
  u = structured.units(model, params)
  rng = np.random.default_rng(0)
  hf = [rng.random(n) for n in u.heads]
  nf = [rng.random(n) * 0.01 for n in u.neurons]
  keep = structured.search(model, params, hf, nf, budget=0.6, seq_len=8)
  assert structured.keep_flops(model, params, keep, 8) <= 0.6 + 1e-9
  head, neuron = structured.unit_flops(model, params, 8)
  limit = 0.6 * structured.block_flops(model, params, 8)
  hs, ns = np.sort(np.concatenate(hf))[::-1], np.sort(np.concatenate(nf))[::-1]
  best = max(hs[:h].sum() + ns[:min(len(ns), int((limit - h * head) // neuron))].sum()
             for h in range(len(hs) + 1) if h * head <= limit)
  kept = sum(f[k].sum() for f, k in zip(hf, keep.heads)) + sum(f[k].sum() for f, k in zip(nf, keep.neurons))
  np.testing.assert_allclose(kept, best)
  # layers=[1]: layer 0 stays whole
  keep1 = structured.search(model, params, hf, nf, budget=0.8, seq_len=8, layers=[1])
  assert keep1.heads[0].all() and keep1.neurons[0].all()


@pytest.mark.parametrize('make', [_llama, _bert])
def test_tune_solves_the_least_squares_of_each_sublayer(make):
  model, params = make()
  batches = _batches(model)
  keep = _keep(model, params, seed=5)
  keep = structured.Keep((np.array([True, False]), np.array([False, True])) if model.family == 'llama' else
                         (np.array([True, False, True, False]), np.array([False, True, True, True])), keep.neurons)
  small_model, small = structured.slice_units(model, params, keep)
  tuned = structured.tune(model, params, small_model, small, batches, damping=0.0, norm_metric=False)
  # float64 reference of layer 0's attention scales: columns = each kept unit's contribution over real tokens
  u = structured.units(small_model, small)
  rows = u.group * u.head_dim
  a_cols, r_all = [], []
  embed = jax.jit(model.embed)
  inputs = jax.jit(lambda bp, h, ctx: model.block_linear_inputs(bp, h, ctx)[1])
  for batch in batches:
    ctx = model.context(batch['tokens'], attention_mask=batch['attention_mask'])
    h = embed(params, batch['tokens'])
    xd = inputs(model.block_params(params, 0), h, ctx)
    xs = inputs(small['layers'][0], h, ctx)
    w = batch['attention_mask'].reshape(-1).astype(bool)
    f64 = lambda x: np.asarray(x, np.float64).reshape(-1, x.shape[-1])[w]
    bp, sp = params['layers'][0]['attn']['o_proj'], small['layers'][0]['attn']['o_proj']
    target = f64(h) + f64(xd[structured.ATTN_O]) @ np.asarray(bp['kernel'], np.float64) + np.asarray(bp['bias'])
    base = f64(h) + np.asarray(sp['bias'], np.float64)
    xo, wo = f64(xs[structured.ATTN_O]), np.asarray(sp['kernel'], np.float64)
    a_cols.append(np.stack([(xo[:, k * rows:(k + 1) * rows] @ wo[k * rows:(k + 1) * rows]).ravel()
                            for k in range(wo.shape[0] // rows)], 1))
    r_all.append((target - base).ravel())
  want = np.linalg.lstsq(np.concatenate(a_cols), np.concatenate(r_all), rcond=None)[0]
  got_w = np.asarray(tuned['layers'][0]['attn']['o_proj']['kernel'], np.float64)
  scale = got_w[::rows, 0] / np.asarray(small['layers'][0]['attn']['o_proj']['kernel'], np.float64)[::rows, 0]
  np.testing.assert_allclose(scale, want, rtol=2e-4)
  # Nothing pruned: every scale (attention and MLP, every layer) is 1 and the model is unchanged.
  full = structured.Keep(tuple(np.ones(n, bool) for n in structured.units(model, params).heads),
                         tuple(np.ones(n, bool) for n in structured.units(model, params).neurons))
  same = structured.tune(model, params, *structured.slice_units(model, params, full), batches, damping=0.0)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_layer_drop():
  model, params = _llama()
  tokens = _batches(model, n=1)[0]['tokens']
  drop_model, dropped = structured.drop_layers(model, params, [1])
  only_second = jax.jit(lambda p, t: model.head(p, model.block(p['layers'][1], model.embed(p, t), model.context(t))))
  np.testing.assert_allclose(jax.jit(drop_model.apply)(dropped, tokens), only_second(params, tokens), atol=1e-6)
  assert drop_model.config.num_layers == 1


def test_bad_inputs_are_refused():
  model, params = _llama()
  u = structured.units(model, params)
  hf, nf = [np.ones(n) for n in u.heads], [np.ones(n) for n in u.neurons]
  for budget in (0.0, 1.5, -0.1, float('nan'), '60%'):
    with pytest.raises(ValueError, match='budget'):
      structured.search(model, params, hf, nf, budget=budget, seq_len=8)
  with pytest.raises(ValueError, match='selects none'):
    structured.search(model, params, hf, nf, budget=0.5, seq_len=8, layers=[5])
  with pytest.raises(ValueError, match='NaN'):
    structured.search(model, params, [np.full(n, np.nan) for n in u.heads], nf, budget=0.5, seq_len=8)
  with pytest.raises(ValueError, match='no calibration batches'):
    structured.fisher(model, params, [], _loss(model))
  bad = {'tokens': jnp.zeros((1, 4), jnp.int32), 'attention_mask': jnp.array([[1.0, np.nan, 1.0, 1.0]])}
  with pytest.raises(ValueError, match='NaN'):
    structured.tune(model, params, model, params, [bad])
