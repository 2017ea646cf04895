"""The streaming driver against whole-batch capture in float64, block structure against the call order,
shared storage, sequential mode and memory that does not grow with the inputs of the calibration set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import calibration as cal
from jaxcompress import core
from jaxcompress.models import layers
from tests.models.test_models import BERT, GPT2, LLAMA, SPECS

OBSERVER = cal.combine(h=cal.hessian(), n=cal.column_norms(), m=cal.abs_max(), a=cal.abs_mean())


def make_batches(n: int, b: int = 2, t: int = 10, seed: int = 0, pad: bool = True) -> list[dict]:
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    lengths = rs.randint(3, t + 1, (b, 1)) if pad else np.full((b, 1), t)
    out.append({'tokens': rs.randint(0, 64, (b, t)).astype(np.int32),
                'attention_mask': (np.arange(t) < lengths).astype(np.int32)})
  return out


def reference_stats(spec, params, batches) -> dict[str, dict[str, np.ndarray]]:
  """float64 statistics of every linear from whole-batch `linear_inputs`, padding rows dropped."""
  ref = {}
  for batch in batches:
    inputs = spec.linear_inputs(params, jnp.asarray(batch['tokens']),
                                attention_mask=jnp.asarray(batch['attention_mask']))
    real = batch['attention_mask'].reshape(-1) > 0
    for path, x in inputs.items():
      x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])[real]
      r = ref.setdefault(path, {'xtx': 0.0, 'sq': 0.0, 'max': 0.0, 'abs': 0.0, 'count': 0})
      r['xtx'] = r['xtx'] + x.T @ x
      r['sq'] = r['sq'] + np.sum(x * x, axis=0)
      r['max'] = np.maximum(r['max'], np.abs(x).max(axis=0))
      r['abs'] = r['abs'] + np.abs(x).sum(axis=0)
      r['count'] += x.shape[0]
  return ref


def rel(a, b) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize('name', sorted(SPECS))
def test_streaming_statistics_equal_whole_batch_capture_in_float64(name):
  spec = SPECS[name]
  params = spec.init(jax.random.key(1))
  batches = make_batches(3)
  stats = cal.calibrate(spec, params, batches, OBSERVER)
  ref = reference_stats(spec, params, batches)
  assert sorted(stats) == sorted(ref)
  assert set(core.select(params)) <= set(stats)
  for path, r in ref.items():
    s = stats[path]
    assert rel(s['h']['xtx'], r['xtx']) < 1e-5, path
    assert rel(s['n']['sq_norm'], r['sq']) < 1e-5, path
    assert rel(cal.norms(s['n']), np.sqrt(r['sq'])) < 1e-5, path
    assert rel(s['m']['abs_max'], r['max']) < 1e-5, path
    assert rel(s['a']['abs_sum'], r['abs']) < 1e-5, path
    assert int(s['h']['count']) == int(s['n']['count']) == r['count'], path
  # padding is excluded: fewer tokens than B * T in total
  assert r['count'] < sum(b['tokens'].size for b in batches)


def test_each_block_compiles_once_and_stats_come_in_call_order():
  traced = []
  hess = cal.hessian()
  counting = cal.Observer(hess.init, lambda s, x, m: (traced.append(1), hess.update(s, x, m))[1])
  params = LLAMA.init(jax.random.key(0))
  stats = cal.calibrate(LLAMA, params, make_batches(4), counting)
  # one trace of the block step for both (same-shaped) blocks, one of the head step: 7 linears + lm_head
  assert len(traced) == 7 + 1
  expected = [f'layers/{i}/{k}' for i in range(2) for g in LLAMA.block_structure() for k in g.kernels]
  assert list(stats) == expected + ['lm_head/kernel']


def test_host_params_and_offloaded_hidden_states_give_identical_stats():
  params = GPT2.init(jax.random.key(0))
  batches = make_batches(2)
  on_device = cal.calibrate(GPT2, params, batches, cal.hessian())
  host = cal.calibrate(GPT2, jax.device_get(params), batches, cal.hessian(), offload=True)
  for path in on_device:
    assert isinstance(host[path]['xtx'], np.ndarray)
    np.testing.assert_array_equal(host[path]['xtx'], on_device[path]['xtx'])


@pytest.mark.parametrize('name', sorted(SPECS))
def test_block_structure_is_the_call_order_and_the_declared_norms_feed_the_groups(name):
  spec = SPECS[name]
  params = spec.init(jax.random.key(2))
  tokens = jnp.asarray(make_batches(1)[0]['tokens'])
  ctx = spec.context(tokens)
  h = spec.embed(params, tokens) + 1.0  # away from zero, so a zero input below comes only from the norm
  block = params['layers'][0]
  groups = spec.block_structure()
  # call order as captured under jit (an OrderedDict keeps its order through jit)
  _, inputs = jax.jit(spec.block_linear_inputs)(block, h, ctx)
  order = list(inputs)
  assert order == [k for g in groups for k in g.kernels]
  whole = jax.jit(spec.linear_inputs)(params, tokens)
  whole = [p.removeprefix('layers/0/') for p in whole if p.startswith('layers/0/')]
  assert whole == order
  assert sorted(order) == sorted(p.removeprefix('layers/0/') for p in spec.linear_paths(params)
                                 if p.startswith('layers/0/'))
  for g in groups:  # one input per group, and a different one for each group
    for k in g.kernels:
      np.testing.assert_array_equal(inputs[k], inputs[g.kernels[0]])
  firsts = [inputs[g.kernels[0]] for g in groups]
  for a in range(len(firsts)):
    for b in range(a + 1, len(firsts)):
      assert firsts[a].shape != firsts[b].shape or not np.allclose(firsts[a], firsts[b])
  for g in groups:  # zeroing the declared norm zeroes exactly this group's input
    if g.norm is None:
      continue
    zeroed = jax.tree.map(lambda x: x, block)
    zeroed[g.norm] = jax.tree.map(jnp.zeros_like, block[g.norm])
    _, rec = spec.block_linear_inputs(zeroed, h, ctx)
    np.testing.assert_array_equal(rec[g.kernels[0]], 0.0)
  # post-norm BERT declares none: its norms' outputs also feed the residual, so no scale can be folded there
  assert any(g.norm for g in groups) != (name == 'bert')


def test_block_structure_drops_removed_kernels():
  block = jax.tree.map(lambda x: x, LLAMA.init(jax.random.key(0))['layers'][0])
  del block['mlp']
  names = [g.name for g in LLAMA.block_structure(block)]
  assert names == ['attn_in', 'attn_out']


def test_capture_inside_scan_raises_instead_of_leaking_tracers():
  params = LLAMA.init(jax.random.key(0))
  tokens = jnp.asarray(make_batches(1)[0]['tokens'])
  with pytest.raises(ValueError, match='nested'):
    with layers.capture_inputs():
      LLAMA.apply(params, tokens, scan=True)
  with layers.capture_inputs() as records:  # the same thing without the nested transform records all 15
    LLAMA.apply(params, tokens)
  assert len(records) == 15


def test_tied_model_blocks_and_calibration():
  params = LLAMA.init(jax.random.key(0))
  paths = [f'layers/{i}/mlp/up_proj/kernel' for i in range(2)]
  tied = core.tie(params, paths, 'up')
  untied = core.paths.replace(params, {p: tied[core.SHARED]['up'] for p in paths})
  tokens = jnp.asarray(make_batches(1)[0]['tokens'])
  ctx, h = LLAMA.context(tokens), LLAMA.embed(tied, tokens)
  with pytest.raises(ValueError, match='block_params'):
    LLAMA.block(tied['layers'][1], h, ctx)
  out_t, rec_t = LLAMA.block_linear_inputs(LLAMA.block_params(tied, 1), h, ctx)
  out_u, rec_u = LLAMA.block_linear_inputs(untied['layers'][1], h, ctx)
  np.testing.assert_array_equal(out_t, out_u)
  np.testing.assert_array_equal(LLAMA.block(LLAMA.block_params(tied, 1), h, ctx), out_u)
  assert list(rec_t) == list(rec_u)
  batches = make_batches(2)
  s_t = cal.calibrate(LLAMA, tied, batches, cal.hessian())
  s_u = cal.calibrate(LLAMA, untied, batches, cal.hessian())
  assert list(s_t) == list(s_u)
  for path in s_u:
    np.testing.assert_array_equal(s_t[path]['xtx'], s_u[path]['xtx'])
  # sequential mode may keep the reference: the tied storage stays shared and untouched
  new, _ = cal.run_sequential(LLAMA, tied, batches, cal.hessian(), lambda i, bp, s: tied['layers'][i])
  assert isinstance(new['layers'][1]['mlp']['up_proj']['kernel'], core.Shared)


def test_sequential_identity_equals_calibrate():
  params = BERT.init(jax.random.key(0))
  batches = make_batches(3)
  plain = cal.calibrate(BERT, params, batches, OBSERVER, head=False)
  seen = []

  def identity(i, block, stats):
    seen.append((i, sorted(stats)))
    return block

  new, seq = cal.run_sequential(BERT, params, batches, OBSERVER, identity)
  assert [i for i, _ in seen] == [0, 1]
  assert seen[0][1] == sorted(p.removeprefix('layers/0/') for p in plain if p.startswith('layers/0/'))
  assert list(seq) == list(plain)
  for path in plain:
    for a, b in zip(jax.tree.leaves(seq[path]), jax.tree.leaves(plain[path])):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=path)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_sequential_feeds_the_next_block_the_compressed_outputs():
  params = LLAMA.init(jax.random.key(0))
  batches = make_batches(3)

  def zero_down_proj_of_block_0(i, block, stats):
    if i != 0:
      return block
    block = jax.tree.map(lambda x: x, block)
    block['mlp']['down_proj']['kernel'] = jnp.zeros_like(block['mlp']['down_proj']['kernel'])
    return block

  new, seq = cal.run_sequential(LLAMA, params, batches, cal.hessian(), zero_down_proj_of_block_0)
  np.testing.assert_array_equal(new['layers'][0]['mlp']['down_proj']['kernel'], 0.0)
  manual = jax.tree.map(lambda x: x, params)
  manual['layers'][0]['mlp']['down_proj']['kernel'] = jnp.zeros_like(params['layers'][0]['mlp']['down_proj']['kernel'])
  ref_original = reference_stats(LLAMA, params, batches)
  ref_compressed = reference_stats(LLAMA, manual, batches)
  for path in seq:
    # block 0 is calibrated before its compression, block 1 on the compressed block 0's outputs
    ref = (ref_original if path.startswith('layers/0/') else ref_compressed)[path]['xtx']
    assert rel(seq[path]['xtx'], ref) < 1e-5, path
  assert rel(seq['layers/1/attn/q_proj/kernel']['xtx'], ref_original['layers/1/attn/q_proj/kernel']['xtx']) > 1e-3


def test_sequential_on_the_original_model_sees_the_blocks_as_given():
  params = LLAMA.init(jax.random.key(0))
  batches = make_batches(3)

  def zero_down_proj(i, block, stats):
    block = jax.tree.map(lambda x: x, block)
    block['mlp']['down_proj']['kernel'] = jnp.zeros_like(block['mlp']['down_proj']['kernel'])
    return block

  new, seq = cal.run_sequential(LLAMA, params, batches, cal.hessian(), zero_down_proj, calibrate_on='original')
  for i in range(2):
    np.testing.assert_array_equal(new['layers'][i]['mlp']['down_proj']['kernel'], 0.0)
  ref = reference_stats(LLAMA, params, batches)  # every block on the uncompressed model's hidden states
  for path in seq:
    assert rel(seq[path]['xtx'], ref[path]['xtx']) < 1e-5, path
  with pytest.raises(ValueError, match="calibrate_on='origin'"):
    cal.run_sequential(LLAMA, params, batches, cal.hessian(), zero_down_proj, calibrate_on='origin')
  with pytest.raises(ValueError, match='per_group=False'):
    cal.run_sequential(LLAMA, params, batches, cal.hessian(), zero_down_proj, calibrate_on='original',
                       per_group=True)


def test_live_device_bytes_do_not_grow_with_the_linear_inputs_of_more_batches():
  """Between steps the driver holds the stats, the block, each batch's tokens and hidden states; never the
  linear inputs. The growth from 1 to 8 batches is bounded by 7 batches' tokens, masks and hidden states."""
  params = LLAMA.init(jax.random.key(0))
  base = {id(a) for a in jax.live_arrays()}

  def peak(n):
    high = [0]

    def probe(phase, block, batch):
      high[0] = max(high[0], sum(a.nbytes for a in jax.live_arrays() if id(a) not in base))

    cal.calibrate(LLAMA, params, make_batches(n, b=4, t=16), cal.hessian(), on_step=probe)
    return high[0]

  one, eight = peak(1), peak(8)
  per_batch = 4 * 16 * (4 + 4 + 32 * 4)  # tokens, attention mask, hidden states [B, T, D] float32
  linear_inputs = 4 * 16 * 4 * (32 * 3 + 32 + 32 * 2 + 48)  # every linear's input of one block, one batch
  assert eight - one <= 8 * per_batch  # one batch of slack
  assert 7 * per_batch < 7 * linear_inputs  # the bound would catch a driver that kept the inputs


def test_bad_batches_are_refused_with_the_fix():
  params = LLAMA.init(jax.random.key(0))
  with pytest.raises(ValueError, match="'tokens'"):
    cal.calibrate(LLAMA, params, [{'ids': np.zeros((2, 4), np.int32)}], cal.hessian())
  with pytest.raises(ValueError, match='integer'):
    cal.calibrate(LLAMA, params, [np.zeros((2, 4), np.float32)], cal.hessian())
  with pytest.raises(ValueError, match='empty'):
    cal.calibrate(LLAMA, params, [], cal.hessian())
  with pytest.raises(TypeError, match='Observer'):
    cal.calibrate(LLAMA, params, [np.zeros((2, 4), np.int32)], cal.hessian)


def test_per_group_sequential_calibrates_each_group_on_the_groups_compressed_before_it():
  params = LLAMA.init(jax.random.key(0))
  batches = make_batches(2)
  plain = cal.calibrate(LLAMA, params, batches, cal.hessian(), head=False)
  calls = []

  def zero_v_proj(i, block, stats):
    calls.append((i, tuple(stats)))
    if 'attn/v_proj/kernel' not in stats:
      return block
    block = jax.tree.map(lambda x: x, block)
    block['attn']['v_proj']['kernel'] = jnp.zeros_like(block['attn']['v_proj']['kernel'])
    return block

  _, per_group = cal.run_sequential(LLAMA, params, batches, cal.hessian(), zero_v_proj, per_group=True)
  _, per_block = cal.run_sequential(LLAMA, params, batches, cal.hessian(), zero_v_proj)
  groups = [g.kernels for g in LLAMA.block_structure()]
  assert [c for c in calls[:8]] == [(i, g) for i in range(2) for g in groups]
  # o_proj reads attention over v = 0: all zero once q/k/v were compressed first, not when the block is one pass
  for i in range(2):
    o = f'layers/{i}/attn/o_proj/kernel'
    np.testing.assert_array_equal(per_group[o]['xtx'], 0.0)
    assert np.abs(per_block[o]['xtx']).max() > 0
    assert int(per_group[o]['count']) == int(plain[o]['count'])
  # the first group of block 0 sees the original model in every mode
  for k in groups[0]:
    np.testing.assert_allclose(per_group[f'layers/0/{k}']['xtx'], plain[f'layers/0/{k}']['xtx'], rtol=1e-6)


def test_storage_shared_between_blocks_and_the_head():
  params = BERT.init(jax.random.key(4))
  paths = ['layers/0/attn/q_proj/kernel', 'layers/1/attn/q_proj/kernel', 'mlm_head/transform/kernel']
  tied = core.tie(params, paths, 'square')
  untied = core.paths.replace(params, {p: tied[core.SHARED]['square'] for p in paths})
  batches = make_batches(2)
  s_t = cal.calibrate(BERT, tied, batches, cal.abs_max())
  s_u = cal.calibrate(BERT, untied, batches, cal.abs_max())
  assert list(s_t) == list(s_u) and 'mlm_head/transform/kernel' in s_t
  for path in s_u:
    np.testing.assert_array_equal(s_t[path]['abs_max'], s_u[path]['abs_max'])


def test_deterministic_mode_matches_float64_and_runs_each_row_alone():
  spec = BERT  # post-norm with GELU: where fusing a row's program with its surroundings changed the rounding
  params = spec.init(jax.random.key(1))
  batches = make_batches(1, b=8, t=12, seed=3)
  det = cal.calibrate(spec, params, batches, OBSERVER, deterministic=True)
  ref = reference_stats(spec, params, batches)
  assert list(det) == list(cal.calibrate(spec, params, batches, OBSERVER))
  for path, r in ref.items():
    assert rel(det[path]['h']['xtx'], r['xtx']) < 1e-5, path
    assert rel(det[path]['a']['abs_sum'], r['abs']) < 1e-5, path
    assert rel(det[path]['m']['abs_max'], r['max']) < 1e-5, path
    assert int(det[path]['h']['count']) == r['count'], path
  # each row runs as the same one-row program however the rows are batched: a maximum (exact in any order)
  # over the batch of 8 equals, bit for bit, the one over 8 batches of 1 row
  single = [{k: v[i:i + 1] for k, v in batches[0].items()} for i in range(8)]
  apart = cal.calibrate(spec, params, single, OBSERVER, deterministic=True)
  for path in ref:
    np.testing.assert_array_equal(apart[path]['m']['abs_max'], det[path]['m']['abs_max'], err_msg=path)


def test_an_observer_without_merge_sums_in_deterministic_mode():
  hess = cal.hessian()
  plain = cal.Observer(hess.init, hess.update)  # built before merge existed: merge defaults to a sum
  params = LLAMA.init(jax.random.key(0))
  batches = make_batches(2, b=3)
  a = cal.calibrate(LLAMA, params, batches, plain, deterministic=True)
  b = cal.calibrate(LLAMA, params, batches, hess, deterministic=True)
  for path in b:
    np.testing.assert_array_equal(a[path]['xtx'], b[path]['xtx'])
    assert int(a[path]['count']) == int(b[path]['count'])
  np.testing.assert_array_equal(cal.abs_max().merge({'abs_max': jnp.array([1., 5.])}, {'abs_max': jnp.array([3., 2.])})
                                ['abs_max'], [3., 5.])
