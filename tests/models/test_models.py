"""The model spec's pure functions: composition, calibration hooks, compressed and narrowed weights."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models
from tests.reference_models import relative_error as rel_err

LLAMA = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
GPT2 = models.GPT2(models.GPT2Config(vocab_size=64, n_positions=32, hidden_size=32, num_layers=2, num_heads=4))
BERT = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, mlm_head=True))
SPECS = {'llama': LLAMA, 'gpt2': GPT2, 'bert': BERT}
TOKENS = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 10)))


@pytest.fixture(scope='module', params=sorted(SPECS))
def spec_params(request):
  spec = SPECS[request.param]
  return spec, spec.init(jax.random.key(3))


def test_init_is_deterministic_per_key():
  init = jax.jit(LLAMA.init)
  a, b, c = init(jax.random.key(0)), init(jax.random.key(0)), init(jax.random.key(1))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not np.array_equal(a['layers'][0]['attn']['q_proj']['kernel'], c['layers'][0]['attn']['q_proj']['kernel'])


def test_abstract_params_match_init(spec_params):
  spec, params = spec_params
  abstract = spec.abstract_params()
  assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract) == jax.tree.map(lambda x: (x.shape, x.dtype), params)


def test_embed_blocks_head_compose_to_apply(spec_params):
  spec, params = spec_params
  h = spec.embed(params, TOKENS)
  ctx = spec.context(TOKENS)
  for i in range(spec.num_layers(params)):
    h = spec.block(params['layers'][i], h, ctx)
  np.testing.assert_allclose(spec.head(params, h), spec.apply(params, TOKENS), rtol=1e-5, atol=1e-6)


def test_linear_inputs_cover_every_kernel_and_match_blockwise(spec_params):
  spec, params = spec_params
  inputs = jax.jit(spec.linear_inputs)(params, TOKENS)
  # every kernel the forward pass uses (BERT's pooler only runs in `pooled`)
  assert set(inputs) == set(spec.linear_paths(params)) - {'pooler/dense/kernel'}
  assert set(core.select(params)) <= set(inputs)  # the default selection is exactly what calibration sees
  h, ctx = spec.embed(params, TOKENS), spec.context(TOKENS)
  for i in range(spec.num_layers(params)):
    h_next, local = spec.block_linear_inputs(params['layers'][i], h, ctx)
    for name, x in local.items():
      np.testing.assert_allclose(x, inputs[f'layers/{i}/{name}'], rtol=1e-5, atol=1e-6)
    # each kernel's recorded input times the kernel is what the layer computed
    q = core.linear(local['attn/q_proj/kernel'], params['layers'][i]['attn']['q_proj']['kernel'])
    assert q.shape[:-1] == h.shape[:-1]
    h = h_next


def test_compressed_leaves_run_like_their_dense_arrays(spec_params):
  spec, params = spec_params
  key = iter(jax.random.split(jax.random.key(0), 100))

  def compress(path, w):
    kind = zlib.crc32(path.encode()) % 4  # a stable, path-dependent mix of kinds
    if kind == 0:
      return core.Masked(w, jax.random.bernoulli(next(key), 0.5, w.shape))
    if kind == 1:
      return core.quantize(w, bits=4, group_size=16)
    if kind == 2:
      return core.LowRank(w[:, :8], jnp.eye(8, w.shape[1]))
    return w

  compressed = core.select(params).map(compress, params)
  dense = core.materialize_tree(compressed)
  np.testing.assert_allclose(jax.jit(spec.apply)(compressed, TOKENS), jax.jit(spec.apply)(dense, TOKENS),
                             rtol=1e-5, atol=1e-5)


def test_shared_weights_run_and_sum_gradients():
  params = LLAMA.init(jax.random.key(0))
  paths = [f'layers/{i}/mlp/up_proj/kernel' for i in range(2)]
  tied = core.tie(params, paths, 'up')
  untied = core.paths.replace(params, {p: tied[core.SHARED]['up'] for p in paths})
  np.testing.assert_allclose(LLAMA.apply(tied, TOKENS), LLAMA.apply(untied, TOKENS), rtol=1e-6)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(LLAMA.apply(p, TOKENS) ** 2)))
  g_tied = grad(tied)[core.SHARED]['up']
  g_untied = grad(untied)
  np.testing.assert_allclose(g_tied, sum(core.paths.get(g_untied, p) for p in paths), rtol=1e-5, atol=1e-6)
  assert core.stats.totals(tied).stored == core.stats.totals(params).stored - params['layers'][0]['mlp'][
      'up_proj']['kernel'].size


def test_narrowed_mlp_equals_zeroed_channels():
  """Dropping MLP channels (structured pruning) equals zeroing them: sizes come from the weights."""
  params = LLAMA.init(jax.random.key(0))
  keep = jnp.arange(48) < 40
  zeroed = jax.tree.map(lambda x: x, params)
  narrowed = jax.tree.map(lambda x: x, params)
  for i in range(2):
    mlp = params['layers'][i]['mlp']
    zeroed['layers'][i]['mlp']['up_proj']['kernel'] = mlp['up_proj']['kernel'] * keep
    narrowed['layers'][i]['mlp'] = {'gate_proj': {'kernel': mlp['gate_proj']['kernel'][:, :40]},
                                    'up_proj': {'kernel': mlp['up_proj']['kernel'][:, :40]},
                                    'down_proj': {'kernel': mlp['down_proj']['kernel'][:40]}}
  np.testing.assert_allclose(LLAMA.apply(narrowed, TOKENS), LLAMA.apply(zeroed, TOKENS), rtol=1e-5, atol=1e-6)


def test_fewer_heads_equals_zeroed_heads():
  params = GPT2.init(jax.random.key(0))
  hd, keep = 8, [0, 2]  # keep heads 0 and 2 of 4 in layer 1
  cols = np.concatenate([np.arange(h * hd, (h + 1) * hd) for h in keep])
  attn = params['layers'][1]['attn']
  narrowed = jax.tree.map(lambda x: x, params)
  narrowed['layers'][1]['attn'] = {
      **{p: {'kernel': attn[p]['kernel'][:, cols], 'bias': attn[p]['bias'][cols]} for p in ('q_proj', 'k_proj', 'v_proj')},
      'o_proj': {'kernel': attn['o_proj']['kernel'][cols], 'bias': attn['o_proj']['bias']}}
  row_mask = np.zeros((32, 1), np.float32)
  row_mask[cols] = 1
  zeroed = jax.tree.map(lambda x: x, params)
  zeroed['layers'][1]['attn']['o_proj']['kernel'] = attn['o_proj']['kernel'] * row_mask
  assert rel_err(GPT2.apply(narrowed, TOKENS), GPT2.apply(zeroed, TOKENS)) < 1e-5


def test_summary_counts_flops_and_bytes():
  params = LLAMA.init(jax.random.key(0))
  s = LLAMA.summary(params, seq_len=16)
  kernels = sum(x.size for p, x in core.flatten(params).items() if p.endswith('kernel'))
  attn_flops = 2 * 2 * 32 * (16 + 1) / 2 * 2  # QK^T and AV, mean causal context, 2 layers
  assert s.total.flops == 2 * kernels + int(attn_flops)
  assert s.total.params == sum(x.size for x in jax.tree.leaves(params))
  assert s.total.disk == 4 * s.total.params
  assert 'layers/1' in str(s)


def test_sentence_embedding_is_normalized_mean():
  spec = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                       intermediate_size=48, max_position_embeddings=32))
  params = spec.init(jax.random.key(0))
  mask = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4])
  emb = spec.sentence_embedding(params, TOKENS, mask)
  h = spec.hidden_states(params, TOKENS, attention_mask=mask)
  ref = np.asarray(h[1, :6], np.float64).mean(0)
  np.testing.assert_allclose(emb[1], ref / np.linalg.norm(ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(emb, axis=-1), 1.0, rtol=1e-6)
  assert spec.pooled(params, TOKENS, attention_mask=mask).shape == (2, 32)


def _loss(p, **kw):
  return jnp.sum(LLAMA.apply(p, TOKENS, **kw) ** 2)


@pytest.fixture(scope='module')
def quantized_reference():
  """(params with quantized up_proj kernels, loss, gradients) without remat or scan: one reference for every
  remat / scan case."""
  params = jax.jit(LLAMA.init)(jax.random.key(0))
  params = core.paths.replace(params, {f'layers/{i}/mlp/up_proj/kernel': core.quantize(
      params['layers'][i]['mlp']['up_proj']['kernel'], bits=4, group_size=16) for i in range(2)})
  return (params, *jax.jit(jax.value_and_grad(_loss, allow_int=True))(params))


@pytest.mark.parametrize('remat,scan', [(True, False), (False, True), (True, True)])
def test_remat_and_scan_compute_the_same_loss_and_gradients(quantized_reference, remat, scan):
  params, ref_v, ref_g = quantized_reference
  v, g = jax.jit(jax.value_and_grad(lambda p: _loss(p, remat=remat, scan=scan), allow_int=True))(params)
  np.testing.assert_allclose(v, ref_v, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref_g)):
    if a.dtype != jax.dtypes.float0:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scan_refuses_blocks_of_different_shapes():
  params = LLAMA.init(jax.random.key(0))
  mlp = params['layers'][0]['mlp']
  params['layers'][0]['mlp'] = {'gate_proj': {'kernel': mlp['gate_proj']['kernel'][:, :40]},
                                'up_proj': {'kernel': mlp['up_proj']['kernel'][:, :40]},
                                'down_proj': {'kernel': mlp['down_proj']['kernel'][:40]}}
  with pytest.raises(ValueError, match='scan=True needs blocks of identical structure and shapes; block 1'):
    LLAMA.apply(params, TOKENS, scan=True)


def test_pooler_counts_no_flops_per_token():
  spec = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                       intermediate_size=48, max_position_embeddings=32))
  params = spec.init(jax.random.key(0))
  s = spec.summary(params, seq_len=8)
  assert s.rows['pooler'].flops == 0 and s.rows['pooler'].params == 32 * 32 + 32
  assert s.rows['layers/0'].flops == 2 * (4 * 32 * 32 + 2 * 32 * 48)


@pytest.mark.parametrize('make', [
    lambda tie: models.GPT2(models.GPT2Config(vocab_size=64, n_positions=32, hidden_size=32, num_layers=1,
                                              num_heads=4, tie_embeddings=tie)),
    lambda tie: models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                                              intermediate_size=48, mlm_head=True, tie_embeddings=tie)),
], ids=['gpt2', 'bert_mlm'])
def test_untied_head_costs_the_flops_of_the_tied_one(make):
  tied, untied = make(True), make(False)
  pt, pu = tied.init(jax.random.key(0)), untied.init(jax.random.key(0))
  assert tied.summary(pt, seq_len=8).total.flops == untied.summary(pu, seq_len=8).total.flops
  assert untied.summary(pu).total.params == tied.summary(pt).total.params + 64 * 32
