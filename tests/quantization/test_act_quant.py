"""Activation quantization (W4A8, W4A4) and QuaRot's online Hadamard on down_proj's input: a float64 NumPy reference
of per-token rounding, the online-rotated model is the same function (and exports as the plain weights transformers
runs), and on the fixture the online rotation halves what 4-bit activations cost."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models, quantization, recipes
from jaxcompress.core import hadamard
from tests import xla_settings
from tests.quantization.test_quarot import _gpt2, _llama, _perturbed, _tokens

REPO = pathlib.Path(__file__).resolve().parents[2]


def _ref(x, w, bits, grid='narrow'):
  """NumPy float64: x rounded per token to a symmetric bits-bit absmax grid, then times w. 'narrow': codes
  ±(2^(bits-1) - 1), scale max|x| / (2^(bits-1) - 1); 'full' (compressed-tensors'): codes [-2^(bits-1),
  2^(bits-1) - 1], scale max|x| / ((2^bits - 1) / 2).
  On the 'full' grid each token's largest |x| lands on a rounding tie (x / s = ±(2^bits - 1) / 2), which the
  float32 division decides, here as in torch and in jaxcompress: the ratio is taken in float32, the rest in float64.
  """
  qmax = 2 ** (bits - 1) - 1
  lo, half_range = (-qmax, qmax) if grid == 'narrow' else (-qmax - 1, (2 ** bits - 1) / 2)
  s = np.abs(x).max(axis=-1, keepdims=True) / np.float32(half_range)
  s[s == 0] = 1.0
  ratio = (x.astype(np.float32) / s.astype(np.float32)).astype(np.float64)
  return (np.clip(np.round(ratio), lo, qmax) * s.astype(np.float64)) @ w.astype(np.float64)


@pytest.mark.parametrize('bits, grid', [(8, 'narrow'), (4, 'narrow'), (8, 'full'), (4, 'full')])
def test_act_quantized_linear_equals_a_float64_reference(bits, grid):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((3, 5, 64)).astype(np.float32)
  x[..., 7] *= 30.0  # an outlier channel: it sets every token's scale
  x[0, 0] = 0.0  # an all-zero token keeps scale 1
  x[1, 2, 7] = -abs(x[1, 2, 7])  # a token whose largest |x| is negative: on the 'full' grid it is code -2^(bits-1)
  w = rng.standard_normal((64, 24)).astype(np.float32)
  got = np.asarray(core.linear(jnp.asarray(x), quantization.ActQuantized(jnp.asarray(w), bits=bits, grid=grid)))
  np.testing.assert_allclose(got, _ref(x, w, bits, grid), rtol=2e-5, atol=2e-5)
  assert not np.allclose(got, x @ w, rtol=1e-3, atol=1e-3)  # the rounding is applied
  other = 'full' if grid == 'narrow' else 'narrow'
  assert not np.allclose(got, _ref(x, w, bits, other), rtol=1e-4, atol=1e-4)  # the grids differ


def test_per_token_codes_are_those_of_correctly_rounded_division():
  """x / s computed as x · (1 / s) (XLA's rewrite of a division by a broadcast value) moves values near a rounding
  boundary to the next code; the codes here are exactly those of float32 division, as torch computes them."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((512, 96)).astype(np.float32)
  s = (np.abs(x).max(-1, keepdims=True) / np.float32(127.5)).astype(np.float32)
  want = np.clip(np.round(x / s), -128, 127) * s
  got = np.asarray(jax.jit(lambda v: core.quantize_tokens(v, 8, 'full'))(x))
  np.testing.assert_array_equal(got, want)


def _static_ref(x, w, bits, grid, scale, zero=0):
  """NumPy float64: x rounded with one static scale and zero point, (clip(round(x / s + z), lo, hi) - z) · s, then
  times w (the ratio x / s in float32, as torch and jaxcompress take it); 'fp8' snaps x / s to float8_e4m3fn."""
  ratio = (x.astype(np.float32) / np.float32(scale)).astype(np.float64)
  if grid == 'fp8':
    codes = np.clip(ratio, -448, 448).astype(jnp.float8_e4m3fn).astype(np.float64)
  else:
    qmax = 2 ** (bits - 1) - 1
    lo = -qmax - 1 if grid == 'full' else -qmax
    codes = np.clip(np.round(ratio + zero), lo, qmax) - zero
  return (codes * np.float64(np.float32(scale))) @ w.astype(np.float64)


@pytest.mark.parametrize('bits, grid, zero', [(8, 'full', None), (8, 'full', -37), (4, 'full', 3), (8, 'fp8', None),
                                              (8, 'narrow', None)])
def test_static_activation_rounding_equals_a_float64_reference(bits, grid, zero):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((3, 5, 64)).astype(np.float32)
  x[0, 1, 3] = 40.0  # beyond the calibrated range: clipped
  w = rng.standard_normal((64, 24)).astype(np.float32)
  scale = np.float32(2.5 / (2 ** (bits - 1)) if grid != 'fp8' else 2.5 / 448)
  leaf = quantization.ActQuantized(jnp.asarray(w), scale=jnp.asarray(scale),
                                   zero=None if zero is None else jnp.asarray(zero, jnp.int32), bits=bits, grid=grid,
                                   symmetric=zero is None)
  got = np.asarray(jax.jit(core.linear)(jnp.asarray(x), leaf))
  want = _static_ref(x, w, bits, grid, scale, 0 if zero is None else zero)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  per_token = _ref(x, w, bits, 'full' if grid == 'fp8' else grid)
  assert not np.allclose(got, per_token, rtol=1e-3, atol=1e-3)  # one scale for the tensor, not one per token


def _asym_tokens_ref(x, w, bits, grid):
  """NumPy float64: each token rounded on its own asymmetric grid, then times w. lo = min(x, 0), hi = max(x, 0),
  s = (hi - lo) / (2^bits - 1), z = clip(round(qmin - lo / s), qmin, qmax), x̂ = (clip(round(x / s + z), qmin,
  qmax) - z) · s; an all-zero token keeps s = 1. The scale and the ratios are taken in float32, as torch takes them
  (compressed-tensors' dynamic asymmetric 'token' scheme)."""
  qmax = 2 ** (bits - 1) - 1
  qmin = -qmax - 1 if grid == 'full' else -qmax
  lo = np.minimum(x.min(-1, keepdims=True), 0).astype(np.float32)
  hi = np.maximum(x.max(-1, keepdims=True), 0).astype(np.float32)
  s = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
  s[s == 0] = 1.0
  z = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax).astype(np.float64)
  ratio = (x.astype(np.float32) / s).astype(np.float64)
  return ((np.clip(np.round(ratio + z), qmin, qmax) - z) * s.astype(np.float64)) @ w.astype(np.float64)


@pytest.mark.parametrize('bits, grid', [(8, 'full'), (4, 'full'), (4, 'narrow')])
def test_asymmetric_per_token_rounding_equals_a_float64_reference(bits, grid):
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((3, 5, 64)).astype(np.float32)
  x[0, 0] = 0.0  # an all-zero token: scale 1, zero point qmin, rounded to 0
  x[1, 1] = np.abs(x[1, 1]) + 0.5  # all positive (after a SiLU, say): the zero point sits at the grid's bottom
  x[2, 3] = -np.abs(x[2, 3])  # all negative: at its top
  x[..., 5] *= 20.0  # an outlier channel
  w = rng.standard_normal((64, 24)).astype(np.float32)
  leaf = quantization.ActQuantized(jnp.asarray(w), bits=bits, grid=grid, symmetric=False)
  got = np.asarray(jax.jit(core.linear)(jnp.asarray(x), leaf))
  np.testing.assert_allclose(got, _asym_tokens_ref(x, w, bits, grid), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got[0, 0], 0.0)
  assert not np.allclose(got, _ref(x, w, bits, grid), rtol=1e-3, atol=1e-3)  # not the symmetric rounding
  # positive tokens use the whole grid where a symmetric one uses half of it: about half the error
  pos = np.abs(rng.standard_normal((64, 64))).astype(np.float32)
  exact = pos.astype(np.float64) @ w.astype(np.float64)
  error = lambda y: np.linalg.norm(y - exact)
  assert error(np.asarray(core.linear(jnp.asarray(pos), leaf))) < 0.7 * error(_ref(pos, w, bits, grid))
  # the stage wraps with the same leaf, and core.serialize keeps its symmetric=False
  model = _llama()
  params = model.init(jax.random.key(0))
  out = quantization.act_quant(model, params, config=quantization.ActQuantConfig(bits=bits, grid=grid,
                                                                                symmetric=False))[1]
  leaves = [w for w in core.flatten(out).values() if isinstance(w, quantization.ActQuantized)]
  assert leaves and all(not w.symmetric and not w.static for w in leaves)
  back = core.serialize.loads(core.serialize.dumps(out))
  assert all(not w.symmetric for w in core.flatten(back).values() if isinstance(w, quantization.ActQuantized))


@pytest.mark.parametrize('bits, grid, symmetric', [(8, 'full', True), (4, 'narrow', True), (4, 'full', False)])
def test_per_group_rounding_equals_a_float64_reference(bits, grid, symmetric):
  """group_size=16: each run of 16 channels of a token rounded on its own grid (the per-token references applied
  to each group); an outlier channel then coarsens its own group only."""
  rng = np.random.default_rng(bits)
  x = rng.standard_normal((3, 5, 64)).astype(np.float32)
  x[..., 7] *= 30.0
  x[0, 0, 16:32] = 0.0  # an all-zero group
  w = rng.standard_normal((64, 24)).astype(np.float64)
  groups = x.reshape(3, 5, 4, 16)
  ref = _ref if symmetric else _asym_tokens_ref
  want = ref(groups, np.eye(16), bits, grid).reshape(x.shape) @ w
  leaf = quantization.ActQuantized(jnp.asarray(w, jnp.float32), bits=bits, grid=grid, symmetric=symmetric,
                                   group_size=16)
  got = np.asarray(jax.jit(core.linear)(jnp.asarray(x), leaf))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  exact = x.astype(np.float64) @ w
  per_token = ref(x, w, bits, grid)
  assert np.linalg.norm(got - exact) < 0.7 * np.linalg.norm(per_token - exact)
  with pytest.raises(ValueError, match='group_size=24 does not divide the input width 64'):
    core.linear(jnp.asarray(x), dataclasses.replace(leaf, group_size=24))
  model = _llama()
  params = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"group_size=24 does not divide layers/0/attn/\w+/kernel's input width"):
    quantization.act_quant(model, params, config=quantization.ActQuantConfig(group_size=24))
  with pytest.raises(ValueError, match='group_size=16 needs static=False'):
    quantization.ActQuantConfig(group_size=16, static=True)
  out = quantization.act_quant(model, params, config=quantization.ActQuantConfig(bits=bits, grid=grid,
                                                                                symmetric=symmetric, group_size=16))[1]
  back = core.serialize.loads(core.serialize.dumps(out))
  assert {w.group_size for w in core.flatten(back).values() if isinstance(w, quantization.ActQuantized)} == {16}


def test_static_qparams_are_compressed_tensors_formulas():
  """Symmetric: s = max(|lo|, |hi|) / half_range; asymmetric: s = (hi - lo) / (2^b - 1), z = round(qmin - lo / s);
  the range always includes 0 and a zero range keeps scale 1."""
  s, z = core.activations.static_qparams(-3.0, 5.1, 8, 'full')
  assert z is None and np.float32(s) == np.float32(5.1 / 127.5)
  assert np.float32(core.activations.static_qparams(-6.0, 1.0, 8, 'fp8')[0]) == np.float32(6.0 / 448)
  s, z = core.activations.static_qparams(-3.0, 5.1, 8, 'full', symmetric=False)
  assert np.isclose(float(s), 8.1 / 255, rtol=1e-6) and int(z) == round(-128 + 3.0 / (8.1 / 255))
  s, z = core.activations.static_qparams(0.5, 2.0, 8, 'full', symmetric=False)  # all positive: lo becomes 0
  assert np.isclose(float(s), 2.0 / 255, rtol=1e-6) and int(z) == -128
  assert float(core.activations.static_qparams(0.0, 0.0, 8, 'full')[0]) == 1.0
  with pytest.raises(ValueError, match="grid='fp8' is symmetric"):
    core.activations.static_qparams(-1.0, 1.0, 8, 'fp8', symmetric=False)


def test_static_stage_calibrates_each_input_as_the_quantized_model_feeds_it():
  """act_quant(static=True): every chosen linear gets the scale (and zero point) of the range of its input over the
  calibration batches in the model as it is quantized (a linear sees the rounding of those before it): the ranges
  `calibration.calibrate` observes on the final model give the same scales; the first block's q_proj input,
  RMSNorm of the embeddings, is checked against float64 NumPy."""
  from jaxcompress import calibration
  model = _llama()
  params = _perturbed(model)
  batches = [{'tokens': _tokens(1)}, {'tokens': _tokens(2)}]
  w8 = quantization.rtn(model, params, config=quantization.RTNConfig(bits=8, group_size=None))[1]
  outs = {}
  for symmetric in (True, False):
    config = quantization.ActQuantConfig(bits=8, grid='full', static=True, symmetric=symmetric)
    _, out = outs[symmetric] = quantization.act_quant(model, w8, batches, config=config)
    ranges = calibration.calibrate(model, out, batches, calibration.min_max())
    leaves = {p: w for p, w in core.flatten(out).items() if isinstance(w, quantization.ActQuantized)}
    assert len(leaves) == 14 and all(isinstance(w.w, core.Quantized) for w in leaves.values())
    for p, w in leaves.items():
      st = ranges[p]
      want_s, want_z = core.activations.static_qparams(jnp.min(st['min']), jnp.max(st['max']), 8, 'full', symmetric)
      assert np.asarray(w.scale) == np.asarray(want_s), p
      assert (w.zero is None) == symmetric and (symmetric or int(w.zero) == int(want_z)), p
    emb = np.asarray(params['embed']['tokens']['embedding'], np.float64)
    h = np.concatenate([emb[np.asarray(b['tokens'])].reshape(-1, emb.shape[1]) for b in batches])
    x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(params['layers'][0]['attn_norm']['scale'])
    q = leaves['layers/0/attn/q_proj/kernel']
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    want = max(-lo, hi) / 127.5 if symmetric else (hi - lo) / 255
    np.testing.assert_allclose(float(q.scale), want, rtol=1e-5)
  held = _tokens(3)
  dynamic = quantization.act_quant(model, w8, config=quantization.ActQuantConfig(bits=8, grid='full'))[1]
  static, out = outs[True][1], outs[False][1]
  ref = model.apply(params, held)
  err = lambda tree: float(jnp.linalg.norm(model.apply(tree, held) - ref) / jnp.linalg.norm(ref))
  assert 0 < err(static) < 0.05 and err(static) != err(dynamic)
  assert core.disk_bytes(core.paths.get(static, 'layers/0/attn/q_proj/kernel')) == core.disk_bytes(
      core.paths.get(w8, 'layers/0/attn/q_proj/kernel')) + 4  # one float32 scale
  back = core.serialize.loads(core.serialize.dumps(out))  # the asymmetric tree: scale and zero point kept
  for p, w in core.flatten(out).items():
    if isinstance(w, quantization.ActQuantized):
      b = core.paths.get(back, p)
      assert b.static and np.asarray(b.scale) == np.asarray(w.scale) and int(b.zero) == int(w.zero), p
  np.testing.assert_array_equal(model.apply(back, held), model.apply(out, held))


def test_grid_names_are_checked():
  with pytest.raises(ValueError, match="grid='wide'.*'narrow', 'full'"):
    quantization.ActQuantConfig(grid='wide')
  with pytest.raises(ValueError, match="grid='wide'"):
    quantization.ActQuantized(jnp.ones((4, 4)), bits=8, grid='wide')


def test_stage_wraps_every_chosen_kernel_around_its_quantized_weight():
  model = _llama()
  params = model.init(jax.random.key(0))
  _, out = recipes.run(recipes.parse('rtn(bits=4, group_size=32) > act_quant(bits=4, exclude=("o_proj",))'),
                       recipes.Context(calib=()), model, params)
  for p, w in core.paths.flatten(out).items():
    if p.startswith('layers/') and p.endswith('kernel'):
      if 'o_proj' in p:
        assert isinstance(w, core.Quantized), p
      else:
        assert isinstance(w, quantization.ActQuantized) and w.bits == 4 and isinstance(w.w, core.Quantized), p
  w4 = quantization.rtn(model, params, config=quantization.RTNConfig(bits=4, group_size=32))[1]
  disk = lambda tree: sum(core.disk_bytes(w) for w in core.paths.flatten(tree).values())
  assert disk(out) == disk(w4)  # the rounding happens at run time: no stored bytes


def test_transpose_is_the_inverse_for_paley_widths():
  x = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)  # 96 = 12 · 8: H is not symmetric
  h = hadamard.hadamard_matrix(96).astype(np.float64) / np.sqrt(96)
  np.testing.assert_allclose(hadamard.hadamard_transform(x, transpose=True), x @ h.T, rtol=1e-5, atol=1e-5)
  back = hadamard.hadamard_transform(hadamard.hadamard_transform(jnp.asarray(x)), transpose=True)
  np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, model, config', [
    ('llama, MLP 64 wide', _llama(), quantization.QuaRotConfig(online=True)),
    ('qwen2, MLP 96 = 12 x 8 wide', _llama(intermediate_size=96, qkv_bias=True, model_type='qwen2'),
     quantization.QuaRotConfig(online=True)),
    ('llama, MLP 56 wide, blocks of 8', _llama(intermediate_size=56),
     quantization.QuaRotConfig(online=True, fallback='block')),
])
def test_online_rotation_is_the_same_function(name, model, config):
  params = _perturbed(model)
  tokens = _tokens()
  want = np.asarray(jax.jit(model.apply)(params, tokens))
  rmodel, rparams = quantization.quarot(model, params, config=config, key=jax.random.key(3))
  assert rmodel.config.online_hadamard == (8 if 'blocks' in name else model.config.intermediate_size), name
  np.testing.assert_allclose(np.asarray(jax.jit(rmodel.apply)(rparams, tokens)), want, atol=1e-5, rtol=1e-5,
                             err_msg=name)
  # down_proj holds Q_fᵀ·(the fused-only kernel): the online rotation is on top of the fused ones
  fused = quantization.quarot(model, params, config=quantization.QuaRotConfig(fallback=config.fallback),
                              key=jax.random.key(3))[1]
  p = 'layers/1/mlp/down_proj/kernel'
  np.testing.assert_allclose(models.hf.plain_weight(rmodel, p, core.paths.get(rparams, p)), core.paths.get(fused, p),
                             atol=1e-5, rtol=1e-5)


def test_bert_online_rotation_is_the_same_function_and_exports_plain_weights(tmp_path):
  """Post-norm BERT: no fused rotation of the stream, so q/k/v, up_proj and down_proj read their input rotated
  online; the dense export holds the plain weights (read back as an unrotated model, the same function)."""
  model = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                        intermediate_size=64, max_position_embeddings=32))
  params = _perturbed(model)
  tokens = _tokens()
  want = np.asarray(jax.jit(model.apply)(params, tokens))
  rmodel, rparams = quantization.quarot(model, params, config=quantization.QuaRotConfig(online=True))
  assert rmodel.config.online_hadamard == 32
  np.testing.assert_allclose(np.asarray(jax.jit(rmodel.apply)(rparams, tokens)), want, atol=1e-5, rtol=1e-5)
  assert not np.allclose(core.paths.get(rparams, 'layers/0/attn/q_proj/kernel'),
                         core.paths.get(params, 'layers/0/attn/q_proj/kernel'))
  models.save_pretrained(tmp_path / 'hf', rmodel, rparams)
  plain_model, plain = models.from_pretrained(tmp_path / 'hf')
  assert plain_model.config.online_hadamard == 0
  np.testing.assert_allclose(np.asarray(plain_model.apply(plain, tokens)), want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='post-norm encoder.*or online=True'):
    quantization.quarot(model, params)


@pytest.mark.slow
def test_online_model_exports_plain_weights_and_its_run_files_keep_the_rotation(tmp_path):
  import torch
  import transformers

  from jaxcompress.recipes import exports, model_dirs
  model = _llama()
  params = _perturbed(model)
  rmodel, rparams = quantization.quarot(model, params, config=quantization.QuaRotConfig(online=True))
  # symmetric: transformers' default compressed-tensors path loads it (docs/interop.md)
  qmodel, qparams = quantization.rtn(rmodel, rparams, config=quantization.RTNConfig(bits=4, group_size=32,
                                                                                    symmetric=True))
  tokens = _tokens()
  logits = np.asarray(qmodel.apply(qparams, tokens))
  # the packed formats cannot hold a down_proj in the rotated basis: not a default, refused by name when asked
  assert exports.allowed(qmodel, qparams) == ('jxc', 'dense')
  with pytest.raises(ValueError, match=r'layers/0/mlp/down_proj/kernel: .*online Hadamard of its input \(online_hadamard=64\)'):
    models.compressed_tensors.export(qmodel, qparams, tmp_path / 'ct')
  models.compressed_tensors.export(qmodel, qparams, tmp_path / 'ct', dense_fallback=True)
  (tmp_path / 'run').mkdir()
  written = exports.write(tmp_path / 'run', qmodel, qparams)
  assert set(written) == {'jxc', 'dense'}
  for hf_dir in (tmp_path / 'run' / 'hf', tmp_path / 'ct'):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
      theirs = hf(torch.tensor(np.asarray(tokens))).logits.float().numpy()
    np.testing.assert_allclose(theirs, logits, rtol=1e-4, atol=1e-4, err_msg=str(hf_dir))
  for kind, directory in (('run', tmp_path / 'run'),
                          ('compressed', model_dirs.save_compressed(tmp_path / 'jc', qmodel, qparams))):
    back_model, back, got_kind = model_dirs.load(directory)
    assert got_kind == kind and back_model.config.online_hadamard == 64
    np.testing.assert_array_equal(np.asarray(back_model.apply(back, tokens)), logits)


@pytest.mark.slow
def test_online_rotation_halves_what_4_bit_activations_cost_on_the_fixture():
  """W4 RTN on the fixture: 4-bit activations cost 5.0 perplexity unrotated, 2.3 after quarot(online=True), while
  8-bit ones cost nothing (the rows of experiments/tables/act_quant_table.py)."""
  from jaxcompress.eval import lm
  from jaxcompress.recipes import fixture
  model, params = fixture.load('fixture')
  held = fixture.data(fixture.FIXTURE_DIR)[2][:64, :65].astype(np.int32)
  ctx = recipes.Context(calib=())

  def ppl(recipe):
    m, p = recipes.run(recipes.parse(recipe), ctx, model, params)
    return lm.rows_perplexity(m, p, held, batch_size=16).perplexity

  w4 = ppl('rtn(bits=4)')
  w4a8 = ppl('rtn(bits=4) > act_quant(bits=8)')
  plain = ppl('rtn(bits=4) > act_quant(bits=4)') - w4
  rotated = ppl('quarot(online=True) > rtn(bits=4) > act_quant(bits=4)') - ppl('quarot(online=True) > rtn(bits=4)')
  assert abs(w4a8 - w4) < 0.05 * plain, (w4, w4a8, plain)
  assert 0 < rotated < 0.6 * plain, (plain, rotated)


def test_refusals_name_the_parameter():
  with pytest.raises(ValueError, match=r'act_quant: bits=1 is outside \[2, 16\]'):
    recipes.parse('act_quant(bits=1)')
  with pytest.raises(ValueError, match='embeddings=True: an embedding lookup has no input activation'):
    recipes.parse('act_quant(embeddings=True)')
  with pytest.raises(ValueError, match=r"act_quant: symmetric=False needs an int grid .*not grid='fp8'"):
    recipes.parse("act_quant(grid='fp8', static=True, symmetric=False)")
  with pytest.raises(ValueError, match=r"grid='fp8' is symmetric"):
    quantization.ActQuantized(jnp.ones((4, 4)), bits=8, grid='fp8', symmetric=False)
  with pytest.raises(ValueError, match=r'static asymmetric grid \(symmetric=False\) needs its zero point'):
    quantization.ActQuantized(jnp.ones((4, 4)), scale=jnp.float32(0.1), bits=8, grid='full', symmetric=False)
  with pytest.raises(ValueError, match=r'a zero point needs a static scale on an int grid and symmetric=False'):
    quantization.ActQuantized(jnp.ones((4, 4)), scale=jnp.float32(0.1), zero=jnp.int32(3), bits=8, grid='full')
  with pytest.raises(ValueError, match=r'head=True: act_quant\(static=True\) compresses the linears of the transformer blocks'):
    recipes.parse('act_quant(static=True, head=True)')
  model = _llama()
  params = model.init(jax.random.key(0))
  once = quantization.act_quant(model, params)[1]
  with pytest.raises(ValueError, match=r'act_quant: layers/0/attn/\w+/kernel already rounds its input \(ActQuantized\)'):
    quantization.act_quant(model, once)
  incoherent = quantization.quip(model, params, [{'tokens': _tokens()}],
                                  config=quantization.QuIPConfig(bits=4, group_size=32))[1]
  with pytest.raises(ValueError, match=r'act_quant\(static=True\): block 0 attn/\w+/kernel is Incoherent: QuIP '
                                       r'rounds the input after its transform.*static=False'):
    quantization.act_quant(model, incoherent, [{'tokens': _tokens()}],
                           config=quantization.ActQuantConfig(static=True))
  with pytest.raises(ValueError, match='needs calibration batches'):
    quantization.act_quant(model, params, config=quantization.ActQuantConfig(static=True))
  gpt2 = _gpt2()
  with pytest.raises(ValueError, match='online=True rotates the input of a Llama-family MLP'):
    quantization.quarot(gpt2, gpt2.abstract_params(), config=quantization.QuaRotConfig(online=True))
  rmodel, rparams = quantization.quarot(model, params, config=quantization.QuaRotConfig(online=True))
  with pytest.raises(ValueError, match='already rotates its inputs online'):
    quantization.quarot(rmodel, rparams, config=quantization.QuaRotConfig(online=True))
  with pytest.raises(ValueError, match='online_hadamard=64 rotates a dense MLP input.*moe_experts=4'):  # MoEfication
    dataclasses.replace(rmodel.config, moe_experts=4, moe_top_k=2)
  from jaxcompress.pruning._src import structured
  with pytest.raises(ValueError, match='structured pruning: the model rotates its MLP input online'):
    structured.structured(rmodel, rparams, [{'tokens': _tokens()}])
  odd = _llama(intermediate_size=56)
  with pytest.raises(ValueError, match=r"MLP width \(intermediate_size\) 56 is not 2\^k times.*fallback='block'"):
    quantization.quarot(odd, odd.abstract_params(), config=quantization.QuaRotConfig(online=True))


@pytest.mark.slow
@pytest.mark.subprocess
def test_table_and_benchmark_scripts_run_small(tmp_path):
  env = xla_settings.environ(PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, capture_output=True,
                                     text=True, timeout=600).stdout
  out = run('experiments/tables/act_quant_table.py', '--small', '--weights=rtn', f'--output_dir={tmp_path}')
  rows = json.loads((tmp_path / 'results.json').read_text())['rows']
  assert len(rows) == 1 + 3 * 3 and all(np.isfinite(r['nll']) for r in rows)
  assert '| RTN W4 | fused + online |' in out
  out = run('experiments/benchmarks/online_hadamard.py', '--small', '--repeats=1', f'--out={tmp_path}/bench.json')
  row, = json.loads((tmp_path / 'bench.json').read_text())['rows']
  assert row['ratio'] > 0 and row['logit_rel_err'] < 1e-5 and '| ratio |' in out
