"""OmniQuant: learnable weight clipping against a float64 NumPy reference of the paper's eq. 2, the leaves hold what
the blocks were trained with, LET's scales leave the function unchanged, training lowers the block error, and on
the fixture it beats round-to-nearest at 3 bits; `calibration.run_blockwise` shows each block the right streams."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import calibration, core, quantization, recipes
from jaxcompress.quantization._src import omniquant as oq
from tests import xla_settings
from tests.quantization.test_quarot import _gpt2, _llama, _perturbed, _tokens

REPO = pathlib.Path(__file__).resolve().parents[2]


def _lwc_ref(w, a, b, bits, group_size):
  """NumPy float64 of eq. 2: h = (γ max − β min) / (2^N − 1), z = −round(β min / h), W_q = clamp(round(W / h) + z),
  γ = sigmoid(a), β = sigmoid(b), the range holding 0; returns (codes [in, out], h, z [G, out], dequantized)."""
  w = w.astype(np.float64)
  g = w.reshape(-1, group_size, w.shape[1])
  sig = lambda x: 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
  hi = np.maximum(sig(a) * g.max(axis=1), 0.0)
  lo = np.minimum(sig(b) * g.min(axis=1), 0.0)
  h = (hi - lo) / (2 ** bits - 1)
  z = np.round(-lo / h)
  q = np.clip(np.round(g / h[:, None]) + z[:, None], 0, 2 ** bits - 1)
  return q.reshape(w.shape), h, z, ((q - z[:, None]) * h[:, None]).reshape(w.shape)


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_lwc_equals_a_float64_reference_and_the_leaf_holds_it(bits):
  rng = np.random.default_rng(bits)
  w = rng.standard_normal((64, 12)).astype(np.float32)
  w[5, 3] = 9.0  # an outlier the clipping can give up
  a = rng.uniform(-1, 5, (4, 12)).astype(np.float32)
  b = rng.uniform(-1, 5, (4, 12)).astype(np.float32)
  codes, h, z, deq = _lwc_ref(w, a, b, bits, 16)
  np.testing.assert_allclose(np.asarray(oq.lwc_fake(jnp.asarray(w), a, b, bits, 16)), deq, rtol=1e-5, atol=1e-6)
  leaf = oq.lwc_leaf(jnp.asarray(w), a, b, bits, 16)
  assert isinstance(leaf, core.Quantized) and leaf.bits == bits and leaf.group_size == 16
  np.testing.assert_array_equal(np.asarray(leaf.codes_unpacked()), codes)
  np.testing.assert_allclose(np.asarray(leaf.scale), h, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(leaf.zero), z)
  np.testing.assert_allclose(np.asarray(leaf.materialize()), deq, rtol=1e-5, atol=1e-6)
  clipped = np.abs(deq - w.astype(np.float64)).max()
  assert clipped > 1.0  # sigmoid(a) < 1 gave the outlier up: the clipping is applied


def test_clipping_logits_get_gradients_through_the_rounding():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((32, 8)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((40, 32)), jnp.float32)
  a = b = jnp.full((2, 8), oq.INIT)
  loss = lambda a, b: jnp.sum(jnp.square(x @ oq.lwc_fake(w, a, b, 3, 16) - x @ w))
  ga, gb = jax.grad(loss, argnums=(0, 1))(a, b)
  assert np.all(np.isfinite(ga)) and np.all(np.isfinite(gb))
  assert np.count_nonzero(np.asarray(ga)) > 8 and np.count_nonzero(np.asarray(gb)) > 8


ONLINE = _llama(online_hadamard=64)  # down_proj's input rotated in the forward: no up_proj -> down_proj pair


@pytest.mark.parametrize('name, model, want', [
    ('llama (GQA, q/k/v biases)', _llama(qkv_bias=True), ['attn/o_proj/kernel', 'mlp/down_proj/kernel']),
    ('gpt2 (layer norms, ungated MLP)', _gpt2(), ['attn/o_proj/kernel']),
    ('llama, online Hadamard', ONLINE, ['attn/o_proj/kernel'])])
def test_let_scales_move_into_norms_and_linears_without_changing_the_block(name, model, want):
  """Norm -> linear scales (norm / s, rows · s) and linear -> linear ones (the first's columns and bias / s, the
  second's rows · s, each key/value head's scale repeated over its query heads) leave the block's function as it
  is; a pair across the online Hadamard would not, which is why none is made there."""
  del name
  params = _perturbed(model)
  block = model.block_params(params, 0)
  flat = core.paths.flatten(block)
  kernels = [k for g in model.block_structure(block) for k in g.kernels]
  lets, pairs = oq._let_groups(model, block, kernels), oq._let_pairs(model, block, kernels)
  assert lets, 'the family has norms feeding linears'
  assert sorted(pairs) == want
  rng = np.random.default_rng(1)
  logs = lambda n: jnp.asarray(rng.uniform(-1, 1, n), jnp.float32)
  h = model.embed(params, _tokens())
  ctx = model.context(_tokens())
  run = lambda b: np.asarray(model.block(b, h, ctx))

  def moved(pairs):
    learn = {'let': {n: logs(flat[ks[0]].shape[0]) for n, ks in lets.items()},
             'pair': {second: logs(flat[first].shape[1]) for second, first in pairs.items()}}
    updates, rows, cols = oq._let(flat, lets, learn, pairs, getattr(model.config, 'dim_per_head', None))
    return core.paths.replace(block, {**updates, **{k: oq._scaled(flat, k, rows, cols) for k in {*rows, *cols}}})
  out = moved(pairs)
  np.testing.assert_allclose(run(out), run(block), rtol=1e-5, atol=1e-5)
  for k in ('attn/q_proj/kernel', 'attn/v_proj/kernel', 'attn/o_proj/kernel'):
    assert not np.allclose(np.asarray(core.paths.get(out, k)), np.asarray(flat[k])), k
  if model is ONLINE:
    across = moved({**pairs, 'mlp/down_proj/kernel': 'mlp/up_proj/kernel'})
    assert not np.allclose(run(across), run(block), rtol=1e-3, atol=1e-3)


def test_let_starts_at_smoothquant_scales():
  """let_alpha=α: log s = log(max|x_j|^α / max|W_j|^(1−α)), max|x_j| over the real tokens (padding excluded):
  q/k/v's input against NumPy float64 RMSNorm of the block's input; v_proj -> o_proj's from o_proj's observed
  input, each key/value head taking the largest of its query heads (GQA)."""
  model = _llama()
  params = _perturbed(model)
  block = model.block_params(params, 0)
  flat = core.paths.flatten(block)
  kernels = [k for g in model.block_structure(block) for k in g.kernels]
  lets, pairs = oq._let_groups(model, block, kernels), oq._let_pairs(model, block, kernels)
  tokens = _tokens(shape=(2, 12))
  mask = np.ones((2, 12), np.int32)
  mask[1, 9:] = 0  # padding: never seen
  h = np.asarray(model.embed(params, tokens), np.float64)
  h[1, 9:] = 0.0
  h[1, 9:, 3] = 1e4  # an outlier channel at the padding positions: it would set that channel's maximum if seen
  rows = calibration.Rows(tokens, jnp.asarray(mask))
  data = calibration.BlockData([jnp.asarray(h, jnp.float32)], [None], [rows])
  let, pair = oq._smooth_init(model, block, data, lets, pairs, model.config.dim_per_head, 0.5)

  x = h[mask > 0] / np.sqrt(np.mean(h[mask > 0] ** 2, axis=-1, keepdims=True) + model.config.rms_norm_eps)
  x = x * np.asarray(flat['attn_norm/scale'], np.float64)
  w = np.max([np.abs(np.asarray(flat[k], np.float64)).max(axis=1) for k in lets['attn_norm']], axis=0)
  np.testing.assert_allclose(np.asarray(let['attn_norm']), np.log(np.abs(x).max(axis=0) ** 0.5 / w ** 0.5),
                             rtol=1e-4, atol=1e-4)
  seen = {}
  model.block_with_inputs(block, jnp.asarray(h, jnp.float32), model.context(tokens, attention_mask=jnp.asarray(mask)),
                          lambda p, v: seen.setdefault(p, np.asarray(v, np.float64)))
  xo = np.abs(seen['attn/o_proj/kernel'][mask > 0]).max(axis=0)
  wo = np.abs(np.asarray(flat['attn/o_proj/kernel'], np.float64)).max(axis=1)
  hd = model.config.dim_per_head
  want = np.log(xo ** 0.5 / wo ** 0.5).reshape(model.config.num_kv_heads, -1, hd).max(axis=1).reshape(-1)
  np.testing.assert_allclose(np.asarray(pair['attn/o_proj/kernel']), want, rtol=1e-4, atol=1e-4)
  assert pair['attn/o_proj/kernel'].shape == (flat['attn/v_proj/kernel'].shape[1],)


def _block_error(model, params, quantized, tokens):
  """Mean squared error of block 1's output (on its compressed-so-far inputs) against the uncompressed model's."""
  seen = {}

  def fit(i, block, data):
    if i == 1:
      seen['target'] = data.targets[0]
    return model.block_params(quantized, i)

  def after(i, block, data):
    if i == 1:
      seen['inputs'] = data.inputs[0]
    return block
  calibration.run_blockwise(model, params, [tokens], fit)
  calibration.run_blockwise(model, quantized, [tokens], after)
  out = model.block(model.block_params(quantized, 1), seen['inputs'], model.context(tokens))
  return float(jnp.mean(jnp.square(out - seen['target'])))


@pytest.mark.slow
def test_training_lowers_the_block_error_and_the_leaves_are_what_was_trained():
  model = _llama()
  params = _perturbed(model)
  tokens = _tokens(shape=(4, 16))
  ctx = recipes.Context(calib=({'tokens': tokens},))
  cfg = dict(bits=3, group_size=16)
  _, init = quantization.omniquant(model, params, ctx, config=quantization.OmniQuantConfig(epochs=0, **cfg))
  _, fitted = quantization.omniquant(model, params, ctx, config=quantization.OmniQuantConfig(epochs=60, lr=0.1,
                                                                                             **cfg))
  for p, w in core.paths.flatten(fitted).items():
    if p.startswith('layers/') and p.endswith('kernel'):
      assert isinstance(w, core.Quantized) and w.bits == 3 and w.group_size == 16, p
  before, after = _block_error(model, params, init, tokens), _block_error(model, params, fitted, tokens)
  assert after < 0.6 * before, (before, after)
  _, again = quantization.omniquant(model, params, ctx, config=quantization.OmniQuantConfig(epochs=60, lr=0.1,
                                                                                            **cfg))
  for x, y in zip(jax.tree.leaves(fitted), jax.tree.leaves(again)):  # the same inputs give the same bits
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_masked_kernels_keep_their_masks():
  model = _llama()
  params = model.init(jax.random.key(0))
  ctx = recipes.Context(calib=({'tokens': _tokens(shape=(2, 16))},))
  m, pruned = recipes.run(recipes.parse('magnitude(sparsity=0.5)'), ctx, model, params)
  _, out = recipes.run(recipes.parse('omniquant(bits=4, group_size=16, epochs=2)'), ctx, m, pruned)
  before, after = core.paths.flatten(pruned), core.paths.flatten(out)
  masked = [p for p, w in before.items() if isinstance(w, core.Masked)]
  assert masked
  for p in masked:
    assert isinstance(after[p], core.Masked) and isinstance(after[p].value, core.Quantized), p
    np.testing.assert_array_equal(np.asarray(after[p].mask), np.asarray(before[p].mask))


def test_run_blockwise_shows_each_block_the_two_streams():
  model = _llama()
  params = model.init(jax.random.key(0))
  tokens = _tokens(shape=(2, 8))
  seen = []

  def zero_block_0(i, block, data):
    seen.append((i, np.asarray(data.inputs[0]), np.asarray(data.targets[0])))
    if i == 0:
      return core.paths.replace(block, {'mlp/down_proj/kernel': jnp.zeros_like(block['mlp']['down_proj']['kernel'])})
    return block
  out = calibration.run_blockwise(model, params, [tokens], zero_block_0)
  assert [i for i, *_ in seen] == [0, 1]
  np.testing.assert_array_equal(seen[0][1], np.asarray(model.embed(params, tokens)))  # block 0: both the embedding
  ctx = model.context(tokens)
  h0 = model.embed(params, tokens)
  np.testing.assert_allclose(seen[0][2], np.asarray(model.block(model.block_params(params, 0), h0, ctx)),
                             rtol=1e-6, atol=1e-6)  # the uncompressed output of block 0
  np.testing.assert_allclose(seen[1][1], np.asarray(model.block(model.block_params(out, 0), h0, ctx)),
                             rtol=1e-6, atol=1e-6)  # block 1 sees block 0 as fitted ...
  assert not np.allclose(seen[1][1], seen[0][2], atol=1e-4)  # ... not the uncompressed stream
  with pytest.raises(ValueError, match='batches is empty'):
    calibration.run_blockwise(model, params, [], zero_block_0)
  with calibration.record_sequential(), pytest.raises(calibration.NotSequential, match='run_blockwise'):
    calibration.run_blockwise(model, params, [tokens], zero_block_0)


def test_refusals_name_the_parameter():
  model = _llama()
  params = model.abstract_params()
  with pytest.raises(ValueError, match=r'omniquant: bits=9 is outside \[2, 8\]'):
    recipes.parse('omniquant(bits=9)')
  with pytest.raises(ValueError, match='embeddings=True'):
    recipes.parse('omniquant(embeddings=True)')
  with pytest.raises(ValueError, match='group_size=24'):
    oq.check(model, params, config=quantization.OmniQuantConfig(group_size=24))


@pytest.mark.slow
def test_beats_round_to_nearest_at_3_bits_on_the_fixture():
  """W3 g128 on the fixture, 64 calibration rows of 64 tokens: OmniQuant's learned clipping beats RTN clearly (the
  frontier table, experiments/tables/frontier_table.py, gives the 128-row figures)."""
  from jaxcompress.eval import lm
  from jaxcompress.recipes import fixture
  model, params = fixture.load('fixture')
  _, train, held_out = fixture.data(fixture.FIXTURE_DIR)
  calib = train.sequences[:64, :64].astype(np.int32)  # 64 tokens a row: half the cost of a fitting step
  held = held_out[:64].astype(np.int32)
  ctx = recipes.Context(calib=tuple({'tokens': calib[i:i + 8]} for i in range(0, 64, 8)))

  def ppl(recipe):
    m, p = recipes.run(recipes.parse(recipe), ctx, model, params)
    return lm.rows_perplexity(m, p, held, batch_size=32).perplexity

  fp = lm.rows_perplexity(model, params, held, batch_size=32).perplexity
  rtn = ppl('rtn(bits=3, group_size=128)')
  omni = ppl('omniquant(bits=3, group_size=128, epochs=5, lr=0.1)')
  print('fp32, RTN, OmniQuant', fp, rtn, omni, (omni - fp) / (rtn - fp))
  # 5 epochs (the method's default is 10): 37% of the gap closed on one 2-core machine (fp32 110.18, RTN 110.91,
  # OmniQuant 110.65; 10 epochs: 38%), a few points more or less on another CPU: the claim checked is that it
  # clearly beats RTN, by more than a quarter of the gap.
  assert omni - fp < 0.75 * (rtn - fp), (fp, rtn, omni)


@pytest.mark.slow
@pytest.mark.subprocess
def test_frontier_table_runs_small(tmp_path):
  env = xla_settings.environ(PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, 'experiments/tables/frontier_table.py', '--small', '--methods=omniquant_let,gptq_mse',
                        '--settings=W4A4', '--rotations=learned', f'--output_dir={tmp_path}'], cwd=REPO,
                       env=env, check=True,
                       capture_output=True, text=True, timeout=600).stdout
  rows = json.loads((tmp_path / 'results.json').read_text())['rows']
  assert len(rows) == 1 + 2 and all(np.isfinite(r['nll']) for r in rows)
  assert '| omniquant_let | learned |' in out and '| gptq_mse | learned |' in out
  assert any('gptq(bits=4, group_size=16, mse=True) > act_quant(bits=4)' in r.get('recipe', '') for r in rows)
  assert (tmp_path / 'frontier.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert ('quarot(online=True) > spinquant(bits=4, group_size=16, act_bits=4) > omniquant(bits=4, group_size=16, '
          'let=True, act_bits=4)') in {r.get('recipe') for r in rows}


@pytest.mark.slow
def test_act_bits_fits_with_rounded_inputs_and_returns_act_quantized_leaves():
  model = _llama()
  params = _perturbed(model)
  ctx = recipes.Context(calib=({'tokens': _tokens(shape=(2, 16))},))
  run = lambda r: recipes.run(recipes.parse(r), ctx, model, params)[1]
  at_init = run('omniquant(bits=4, group_size=16, epochs=0, act_bits=4)')
  for p, w in core.paths.flatten(at_init).items():
    if p.startswith('layers/') and p.endswith('kernel'):
      assert isinstance(w, quantization.ActQuantized) and w.bits == 4 and isinstance(w.w, core.Quantized), p
  same = run('omniquant(bits=4, group_size=16, epochs=0) > act_quant(bits=4)')
  for x, y in zip(jax.tree.leaves(at_init), jax.tree.leaves(same)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  fitted = run('omniquant(bits=4, group_size=16, epochs=3, act_bits=4, let=True)')
  plain = run('omniquant(bits=4, group_size=16, epochs=3, let=True)')
  differ = [p for p, w in core.paths.flatten(fitted).items() if p.endswith('kernel') and p.startswith('layers/')
            and not np.array_equal(np.asarray(w.w.scale), np.asarray(core.paths.get(plain, p).scale))]
  assert differ  # the rounded inputs changed what was learned
  paired = run('omniquant(bits=4, group_size=16, epochs=3, act_bits=4, let=True, let_pairs=True)')
  dense = lambda tree, p: np.asarray(core.materialize(core.paths.get(tree, p)))
  for p in ('layers/0/attn/o_proj/kernel', 'layers/0/mlp/down_proj/kernel', 'layers/0/attn/v_proj/kernel'):
    assert not np.array_equal(dense(paired, p), dense(fitted, p)), p  # the pairs' scales were learned and folded
  smooth = run('omniquant(bits=4, group_size=16, epochs=0, act_bits=4, let=True, let_pairs=True, let_alpha=0.5)')
  for p in ('layers/0/attn/q_proj/kernel', 'layers/0/attn/o_proj/kernel'):  # SmoothQuant's start is folded (at_init:
    assert not np.array_equal(dense(smooth, p), dense(at_init, p)), p     # every scale 1, as without LET)


def test_a_diverging_fit_is_an_error_not_nan_weights():
  model = _llama()
  params = _perturbed(model)
  ctx = recipes.Context(calib=({'tokens': _tokens(shape=(2, 16))},))
  with pytest.raises(ValueError, match=r'omniquant: the fitted let/.* are not finite.*lower lr=0.05 / let_lr=1e\+30'):
    recipes.run(recipes.parse('omniquant(bits=4, group_size=16, epochs=2, let=True, let_lr=1e30)'), ctx, model, params)


def test_bert_with_padding_fits_on_real_tokens_only():
  from jaxcompress import models
  model = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                        intermediate_size=64, max_position_embeddings=32))
  params = model.init(jax.random.key(0))
  tokens = _tokens(shape=(4, 16))
  mask = jnp.asarray(np.arange(16)[None] < np.array([[16], [9], [5], [12]]), jnp.int32)
  run = lambda t: quantization.omniquant(model, params, [{'tokens': t, 'attention_mask': mask}],
                                         config=quantization.OmniQuantConfig(bits=3, group_size=16, epochs=3, let=True))[1]
  out = run(tokens)
  assert all(isinstance(w, core.Quantized) for p, w in core.paths.flatten(out).items()
             if p.startswith('layers/') and p.endswith('kernel'))
  other = run(tokens.at[:, 10:].set(jnp.where(mask[:, 10:] > 0, tokens[:, 10:], 7)))  # other padding tokens
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(other)):  # padding never reaches the fit
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-5, atol=1e-6)
