"""Layer-wise calibration of mixture-of-experts weights: per-expert statistics from the routed tokens equal a
NumPy float64 rebuild of the dispatch; GPTQ and SparseGPT solve each expert like a dense linear; methods
that do not compress experts refuse them by name."""

import math
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxcompress import calibration, core, lowrank, models, pruning, quantization
from jaxcompress.models import layers
from tests.train import pretrain_runs as runs

E, K = 4, 2


def moe_model(capacity):
  cfg = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                           num_kv_heads=2, moe_experts=E, moe_top_k=K, moe_capacity=capacity)
  return models.Llama(cfg)


def batch():
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  mask = np.ones((2, 8), np.int32)
  mask[1, 6:] = 0  # two padding tokens: routed and holding slots like any token, but weighing nothing
  return {'tokens': tokens, 'attention_mask': mask}


def mlp_input(model, params, b):
  """X [N, d]: block 0's MLP input, the rows every expert sees when each has room for every token."""
  wide = moe_model(float(E))  # capacity E / top_k >= 1: C = N
  block = wide.block_params(params, 0)
  h = wide.embed(params, b['tokens'])
  ctx = wide.context(b['tokens'], attention_mask=b['attention_mask'])
  _, inputs = wide.block_linear_inputs(block, h, ctx)
  routed = inputs['mlp/up']
  assert isinstance(routed, layers.Routed) and routed.token is None
  return np.asarray(routed.x[0], np.float64)


def reference(params, x, capacity, weights):
  """{weight name: (XᵀX [E, in, in], count [E])} from the dispatch rebuilt in NumPy float64."""
  moe = {k: np.asarray(v, np.float64) for k, v in params['layers'][0]['mlp'].items()}
  n = x.shape[0]
  scores = x @ moe['router']  # [N, E]
  chose = np.zeros((n, E), bool)
  for t in range(n):
    chose[t, np.argsort(-scores[t])[:K]] = True
  cap = min(n, math.ceil(capacity * n * K / E))
  out = {'up': [], 'gate': [], 'down': []}
  for e in range(E):
    cand = np.flatnonzero(chose[:, e])
    if cap < n:  # the expert's cap highest-scoring tokens among those that chose it; the rest are dropped
      cand = cand[np.argsort(-scores[cand, e], kind='stable')[:cap]]
    xe, we = x[cand], weights[cand]
    g = xe @ moe['gate'][e]
    hid = g / (1 + np.exp(-g)) * (xe @ moe['up'][e])
    count = int(np.sum(we > 0))
    for name, inp in (('up', xe), ('gate', xe), ('down', hid)):
      out[name].append(((inp * we[:, None]).T @ inp, count))
  return {k: (np.stack([a for a, _ in v]), np.array([c for _, c in v])) for k, v in out.items()}


@pytest.mark.parametrize('capacity', [float(E), 0.75])  # nothing dropped; tokens dropped
def test_expert_statistics_equal_numpy_dispatch(capacity):
  model = moe_model(capacity)
  params = model.init(jax.random.key(0))
  b = batch()
  stats = calibration.calibrate(model, params, [b], calibration.hessian(), experts=True, head=False)
  x = mlp_input(model, params, b)
  ref = reference(params, x, capacity, b['attention_mask'].reshape(-1).astype(np.float64))
  if capacity < 1:
    assert ref['up'][1].sum() < K * 14  # some of the 14 real tokens' selections were dropped
  for name, (xtx, count) in ref.items():
    got = stats[f'layers/0/mlp/{name}']
    np.testing.assert_array_equal(np.asarray(got['count']), count, err_msg=name)
    np.testing.assert_allclose(np.asarray(got['xtx']), xtx, rtol=2e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_gptq_solves_each_expert_like_a_dense_linear(monkeypatch):
  model = moe_model(0.75)
  params = model.init(jax.random.key(0))
  seen = []
  solve = calibration.solve_experts

  def record(fn, w, *stats, **kw):
    out = solve(fn, w, *stats, **kw)
    seen.append((np.asarray(w), [np.asarray(s) for s in stats], out))
    return out

  monkeypatch.setattr(calibration, 'solve_experts', record)
  config = quantization.GPTQConfig(bits=4, group_size=16)
  _, q = quantization.gptq(model, params, [batch()], config=config)
  assert len(seen) == 3  # up, gate, down
  for name in ('up', 'gate', 'down'):
    leaf = q['layers'][0]['mlp'][name]
    assert isinstance(leaf, core.Quantized) and leaf.shape == np.shape(params['layers'][0]['mlp'][name])
  assert not core.is_compressed(q['layers'][0]['mlp']['router'])  # the router stays float
  for w, (h,), leaf in seen:
    dense = np.asarray(core.materialize(leaf))
    for e in range(E):
      alone = quantization.gptq_from_hessian(w[e], h[e], bits=4, group_size=16)
      np.testing.assert_array_equal(dense[e], np.asarray(alone.materialize()))
      np.testing.assert_array_equal(np.asarray(leaf.codes[e]), np.asarray(alone.codes))
  # a stacked leaf survives serialization, and the quantized model runs
  back = core.serialize.loads(core.serialize.dumps({'w': q['layers'][0]['mlp']['down']}))['w']
  np.testing.assert_array_equal(np.asarray(back.materialize()), np.asarray(q['layers'][0]['mlp']['down'].materialize()))
  assert np.isfinite(np.asarray(model.apply(q, batch()['tokens']))).all()


def test_sparsegpt_solves_each_expert_from_its_statistics():
  model = moe_model(0.75)
  params = model.init(jax.random.key(0))
  b = batch()
  # one block, calibrated on the model as given (per_group=False): its statistics are calibrate's
  stats = calibration.calibrate(model, params, [b], calibration.hessian(), experts=True, head=False)
  _, got = pruning.sparsegpt(model, params, [b], config=pruning.SparseGPTConfig(per_group=False))
  for name in ('up', 'gate', 'down'):
    w = params['layers'][0]['mlp'][name]
    xtx = stats[f'layers/0/mlp/{name}']['xtx']
    leaf = got['layers'][0]['mlp'][name]
    assert isinstance(leaf, core.Masked) and leaf.shape == w.shape
    for e in range(E):
      alone = pruning.sparsegpt_from_hessian(w[e], xtx[e], sparsity=0.5)
      np.testing.assert_array_equal(np.asarray(leaf.mask[e]), np.asarray(alone.mask), err_msg=name)
      np.testing.assert_array_equal(np.asarray(core.materialize(leaf)[e]), np.asarray(alone.materialize()))
  assert np.isfinite(np.asarray(model.apply(got, b['tokens']))).all()


@pytest.mark.parametrize('method', ['awq', 'w8a8', 'nonuniform', 'svd_llm', 'calibrate'])
def test_methods_that_do_not_compress_experts_refuse_them(method):
  model = moe_model(1.0)
  params = model.init(jax.random.key(0))
  run = {'awq': lambda: quantization.awq(model, params, [batch()]),
         'w8a8': lambda: quantization.w8a8(model, params, [batch()]),
         'nonuniform': lambda: quantization.nonuniform(model, params, [batch()]),
         'svd_llm': lambda: lowrank.compress_model(model, params, [batch()], config=lowrank.SVDConfig(
             method='svd_llm', ranks=lowrank.RankRule(rank=4))),
         'calibrate': lambda: calibration.calibrate(model, params, [batch()], calibration.hessian())}[method]
  with pytest.raises(ValueError, match=r"mixture-of-experts weights \['mlp/up', 'mlp/gate', 'mlp/down'\]"):
    run()


@pytest.mark.slow
@pytest.mark.subprocess
def test_expert_solves_on_eight_devices_equal_one_device(tmp_path):
  out = tmp_path / 'moe.npz'
  proc = subprocess.run([sys.executable, str(runs.ROOT / 'tests' / 'calibration' / 'moe_mesh_run.py'), str(out)],
                        env=runs.env(8), capture_output=True, text=True, timeout=300, cwd=runs.ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = dict(np.load(out))
  assert int(got['devices']) == 8
  for name in ('gptq', 'sparsegpt'):
    np.testing.assert_array_equal(got[f'{name}/mesh'], got[f'{name}/one'], err_msg=name)
