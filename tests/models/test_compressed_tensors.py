"""compressed-tensors export and import: transformers' own loader reads what we write (same logits), and
`from_pretrained` gives back the same codes, scales, zero points."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxcompress import core, models, quantization
from jaxcompress.models import compressed_tensors as ct
from jaxcompress.models import gptq_format
from jaxcompress.models import hf as hf_lib
from jaxcompress.recipes import exports
from tests.models.quantized_leaves import assert_same_leaves, quantize_kernels, random_leaf, round_inputs
from tests.reference_models import VOCAB
from tests.reference_models import relative_error as rel_err
from tests.reference_models import torch_outputs

pytest.importorskip('compressed_tensors.compressors')  # what transformers' loader imports (seconds)
torch = pytest.importorskip('torch')

TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))
TOL = 1e-5  # fp32 relative error of transformers' load of our export against our logits of the same leaves


def logits(model, params, *, compressed=False):
  """Our outputs for TOKENS: on the compressed leaves themselves, or on their dense values (the same numbers;
  the dense tree has one structure for every scheme, so it is compiled once)."""
  return model.apply(params if compressed else jax.jit(core.materialize_tree)(params), jnp.asarray(TOKENS))


@pytest.fixture(scope='module')
def llama(hf_checkpoint):
  return models.from_pretrained(hf_checkpoint('llama')[0])


@pytest.fixture(scope='module')
def bert(hf_checkpoint):
  return models.from_pretrained(hf_checkpoint('bert')[0])


def hf_load(path, auto=transformers.AutoModelForCausalLM):
  """transformers' load of a compressed-tensors directory, float32. Asymmetric 'pack-quantized' schemes go through
  `dequantize=True` (compressed-tensors' own decompressor at load time): in compressed-tensors 0.20.1 the default
  path builds the empty modules with unpacked zero points [out, groups] and refuses the packed ones it writes.
  ('int-quantized' stores them unpacked, and `dequantize=True` would drop the rounding of input activations.)"""
  groups = json.loads((path / 'config.json').read_text())['quantization_config']['config_groups'].values()
  asymmetric = any(not g['weights']['symmetric'] and g['format'] == ct.FORMAT for g in groups)
  kwargs = {'quantization_config': transformers.CompressedTensorsConfig(dequantize=True)} if asymmetric else {}
  return auto.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


# Mixed schemes in one model: several config groups, and dense Linears (the head) listed in `ignore`.
LLAMA_SCHEMES = {
    'w4_g16_sym': lambda p: None if 'lm_head' in p else dict(bits=4, group_size=16, symmetric=True),
    'w3_g16_asym': lambda p: dict(bits=3, group_size=16, symmetric=False),  # codes straddle int32 words
    'w8_channel_asym': lambda p: dict(bits=8, group_size=None, symmetric=False),
    # transformers 5.25 reads mixed schemes on its default path only, which takes symmetric ones (see hf_load).
    'mixed_w8_channel_w2_sym': lambda p: (None if 'lm_head' in p else dict(bits=8, group_size=None, symmetric=True)
                                          if 'attn' in p else dict(bits=2, group_size=8, symmetric=True)),
}


@pytest.mark.parametrize('name', sorted(LLAMA_SCHEMES))
def test_llama_export_loads_in_transformers_and_round_trips(name, llama, tmp_path):
  model, params = llama
  qparams = quantize_kernels(params, LLAMA_SCHEMES[name])
  ct.export(model, qparams, tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
  assert cfg['quant_method'] == 'compressed-tensors' and cfg['format'] == 'pack-quantized'
  assert cfg['ignore'] == ([] if name.endswith('asym') else ['lm_head'])
  ours = logits(model, qparams, compressed=name == 'w4_g16_sym')
  err = rel_err(ours, torch_outputs(hf_load(tmp_path), TOKENS))
  print(f'{name}: transformers logits relative error {err:.2e}')
  assert err <= TOL
  _, loaded = models.from_pretrained(tmp_path)
  assert_same_leaves(qparams, loaded)


def test_bert_export_loads_in_transformers_and_round_trips(bert, tmp_path):
  model, params = bert
  qparams = quantize_kernels(params, lambda p: dict(bits=4, group_size=16, symmetric=False))
  ct.export(model, qparams, tmp_path)
  err = rel_err(logits(model, qparams), torch_outputs(hf_load(tmp_path, transformers.AutoModel), TOKENS))
  print(f'bert w4 g16 asym: transformers hidden-state relative error {err:.2e}')
  assert err <= TOL
  _, loaded = models.from_pretrained(tmp_path)
  assert_same_leaves(qparams, loaded)


def fp8_kernels(params, group_size=None, act=False, act_group_size=None):
  """Every block kernel round-to-nearest FP8 (e4m3, absmax scales), its input rounded to FP8 per token with act
  (per act_group_size channels of a token when given)."""
  def q(path, w):
    if not path.endswith('/kernel') or 'lm_head' in path:
      return w
    leaf = core.quantize(w, fmt='fp8', group_size=group_size)
    return core.ActQuantized(leaf, bits=8, grid='fp8', group_size=act_group_size) if act else leaf
  return core.map_with_path(q, params)


int_kernels = lambda **kw: lambda params: quantize_kernels(params, lambda p: None if 'lm_head' in p else kw)


def static_inputs(model, params, grid='full', symmetric=True):
  """Every block Linear's input rounded with one static scale (and zero point) calibrated on TOKENS."""
  config = quantization.ActQuantConfig(bits=8, grid=grid, static=True, symmetric=symmetric)
  return quantization.act_quant(model, params, [{'tokens': TOKENS.astype(np.int32)}], config=config)[1]


DYNAMIC, DYNAMIC_ASYM = ('token', True, True), ('token', True, False)
GROUPS, GROUPS_ASYM = ('group', True, True), ('group', True, False)
STATIC, STATIC_ASYM = ('tensor', False, True), ('tensor', False, False)
# name: (the leaves, the format compressed-tensors infers for them, input_activations' (strategy, dynamic,
# symmetric)): int weights with per-token dynamic int8 activations (W8A8, W4A8; symmetric, or asymmetric: each
# token's range sets its scale and zero point; or one scale per 16 channels of a token) as 'int-quantized', FP8
# weights
# alone as 'naive-quantized', FP8 W8A8 (llm-compressor's FP8_DYNAMIC) as 'float-quantized'; with static per-tensor
# input scales (llm-compressor's FP8 and static W8A8 schemes), symmetric or (int) asymmetric.
ACT_SCHEMES = {
    'w8a8_channel_sym': (lambda m, p: round_inputs(int_kernels(bits=8, group_size=None)(p)), ct.INT_FORMAT, DYNAMIC),
    'w8a8_channel_asym': (lambda m, p: round_inputs(int_kernels(bits=8, group_size=None, symmetric=False)(p)),
                          ct.INT_FORMAT, DYNAMIC),
    'w4a8_g16_sym': (lambda m, p: round_inputs(int_kernels(bits=4, group_size=16)(p)), ct.INT_FORMAT, DYNAMIC),
    'w8a8_dynamic_asym': (lambda m, p: round_inputs(int_kernels(bits=8, group_size=None)(p), symmetric=False),
                          ct.INT_FORMAT, DYNAMIC_ASYM),
    'w4a4_g16_dynamic_asym': (lambda m, p: round_inputs(int_kernels(bits=4, group_size=16)(p), bits=4,
                                                        symmetric=False), ct.INT_FORMAT, DYNAMIC_ASYM),
    'w4a8_g16_act_g16_sym': (lambda m, p: round_inputs(int_kernels(bits=4, group_size=16)(p), group_size=16),
                             ct.INT_FORMAT, GROUPS),
    'w4a4_g16_act_g16_asym': (lambda m, p: round_inputs(int_kernels(bits=4, group_size=16)(p), bits=4,
                                                        symmetric=False, group_size=16), ct.INT_FORMAT, GROUPS_ASYM),
    'fp8_channel': (lambda m, p: fp8_kernels(p), ct.NAIVE_FORMAT, None),
    'fp8_channel_a8': (lambda m, p: fp8_kernels(p, act=True), ct.FLOAT_FORMAT, DYNAMIC),
    'fp8_g16_a8': (lambda m, p: fp8_kernels(p, group_size=16, act=True), ct.FLOAT_FORMAT, DYNAMIC),
    'fp8_channel_a8_g16': (lambda m, p: fp8_kernels(p, act=True, act_group_size=16), ct.FLOAT_FORMAT, GROUPS),
    'w8a8_static_sym': (lambda m, p: static_inputs(m, int_kernels(bits=8, group_size=None)(p)), ct.INT_FORMAT,
                        STATIC),
    'w8a8_static_asym': (lambda m, p: static_inputs(m, int_kernels(bits=8, group_size=None)(p), symmetric=False),
                         ct.INT_FORMAT, STATIC_ASYM),
    'fp8_static_a8': (lambda m, p: static_inputs(m, fp8_kernels(p), grid='fp8'), ct.FLOAT_FORMAT, STATIC),
}


# The share of positions within TOL of transformers' output asked of a scheme (0.75 unless named). Symmetric int
# grids put each token's (or group's) largest negative value on a rounding tie (x / s = -(2^b - 1) / 2), which
# float error upstream decides; with one scale per 16 channels there are twice as many such ties a token.
AGREE = {'w4a8_g16_act_g16_sym': 0.5}


def per_position_error(ours, theirs):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return np.linalg.norm(ours - theirs, axis=-1) / np.linalg.norm(theirs, axis=-1)


@pytest.mark.parametrize('name', sorted(ACT_SCHEMES))
def test_activation_rounding_and_fp8_export_as_transformers_computes_them(name, llama, tmp_path):
  model, params = llama
  make, fmt, act_args = ACT_SCHEMES[name]
  qparams = make(model, params)
  ct.export(model, qparams, tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())['quantization_config']
  (group,) = cfg['config_groups'].values()
  assert cfg['format'] == group['format'] == fmt and cfg['ignore'] == ['lm_head']
  act = group['input_activations']
  if act_args is not None:
    ((bits, group_size),) = {(w.bits, w.group_size) for w in core.flatten(qparams).values()
                             if isinstance(w, core.ActQuantized)}
    assert (act['num_bits'], act['strategy'], act['dynamic'], act['symmetric']) == (bits, *act_args)
    assert act['group_size'] == group_size
  hf = hf_load(tmp_path)

  # The whole model: float differences upstream (attention, norms) move an activation that sits within float
  # error of a rounding boundary to the neighbouring code now and then; that position then differs by about one
  # code's step, every other position agrees to TOL.
  theirs = torch_outputs(hf, TOKENS)
  err = per_position_error(logits(model, qparams, compressed=True), theirs)
  print(f'{name}: per-position relative error median {np.median(err):.1e}, max {err.max():.1e}, '
        f'{np.mean(err <= TOL):.0%} of positions within {TOL}')
  assert np.mean(err <= TOL) >= AGREE.get(name, 0.75) and err.max() <= 3e-3

  # Each Linear alone (weights decompressed by the forward above), on one input: the same codes, so the same
  # numbers to float error.
  rng = np.random.RandomState(1)
  for row in model.hf_table():
    w = core.paths.get(qparams, row.ours[0])
    if core.is_compressed(w):
      x = rng.randn(2, 12, w.shape[0]).astype(np.float32)
      module = hf.get_submodule(hf_lib.export_name(model, row.hf).removesuffix('.weight'))
      with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
      assert rel_err(w.matmul(jnp.asarray(x)), want) <= 1e-6, row.hf
  # Another rounding is another function, which the check tells apart: the papers' ±127 grid for per-token
  # scales, symmetric ones for asymmetric per-token scales, one scale per token for per-group ones, per-token
  # scales for static ones.
  other = {DYNAMIC: dict(grid='narrow'), DYNAMIC_ASYM: dict(symmetric=True), GROUPS: dict(group_size=None),
           GROUPS_ASYM: dict(group_size=None), STATIC: dict(scale=None),
           STATIC_ASYM: dict(scale=None, zero=None, symmetric=True)}
  if fmt == ct.INT_FORMAT or act_args in (STATIC, STATIC_ASYM, GROUPS):
    changed = jax.tree.map(lambda w: dataclasses.replace(w, **other[act_args]) if isinstance(w, core.ActQuantized)
                           else w, qparams, is_leaf=core.is_weight_leaf)
    assert np.mean(per_position_error(logits(model, changed, compressed=True), theirs) <= TOL) < 0.25
  _, loaded = models.from_pretrained(tmp_path)
  assert_same_leaves(qparams, loaded)


def test_activation_rounding_that_no_format_computes_is_refused(llama, tmp_path):
  model, params = llama
  q = quantize_kernels(params, lambda p: None if 'lm_head' in p else dict(bits=8, group_size=None))
  narrow = round_inputs(q, grid='narrow')
  with pytest.raises(ValueError, match=r"'narrow' grid.*act_quant\(grid='full'\)"):
    ct.export(model, narrow, tmp_path / 'narrow')
  with pytest.raises(ValueError, match='without the rounding of their inputs'):
    ct.export(model, narrow, tmp_path / 'narrow', dense_fallback=True)
  around_dense = core.paths.replace(q, {'layers/0/mlp/up_proj/kernel': core.ActQuantized(
      params['layers'][0]['mlp']['up_proj']['kernel'], bits=8, grid='full')})
  with pytest.raises(ValueError, match=r"layers/0/mlp/up_proj/kernel: ActQuantized, 'full' activation rounding around a dense weight"):
    ct.export(model, around_dense, tmp_path / 'dense')
  fp8_around_int = round_inputs(q, grid='fp8')
  with pytest.raises(ValueError, match=r"'fp8' activation rounding around a Quantized\(fmt='int', bits=8\) weight"):
    ct.export(model, fp8_around_int, tmp_path / 'fp8')
  with pytest.raises(ValueError, match="int-quantized"):
    gptq_format.export(model, round_inputs(q), tmp_path / 'gptq')
  assert not any(tmp_path.iterdir())
  # a run's default formats: the dense weights alone would compute another function, so not dense
  assert exports.allowed(model, round_inputs(q)) == ('jxc', 'compressed-tensors')
  assert exports.allowed(model, narrow) == ('jxc',)
  assert {'compressed-tensors', 'dense'} <= set(exports.allowed(model, q))


def test_unsupported_leaves_are_refused_before_writing(llama, tmp_path):
  model, params = llama
  qparams = quantize_kernels(params, lambda p: dict(bits=4, group_size=16, symmetric=False))
  up = params['layers'][1]['mlp']['up_proj']['kernel']
  odd = {'layers/0/attn/q_proj/kernel': random_leaf((32, 32), group_size=16, fmt='nf4'),
         'layers/1/mlp/up_proj/kernel': core.Masked(up, jnp.abs(up) > 0.01),
         'layers/1/attn/o_proj/kernel': random_leaf((32, 32), group_size=16, act_order=True),
         'embed/tokens/embedding': random_leaf((VOCAB, 32), bits=8)}
  mixed = core.paths.replace(qparams, odd)
  out = tmp_path / 'refused'
  with pytest.raises(ValueError) as e:
    ct.export(model, mixed, out)
  for p in odd:
    assert p in str(e.value)
  assert 'nf4' in str(e.value) and 'Masked' in str(e.value) and 'dense_fallback=True' in str(e.value)
  assert 'act-order groups (g_idx)' in str(e.value) and '--export=gptq' in str(e.value)
  assert not out.exists()

  ct.export(model, mixed, out, dense_fallback=True)  # those paths written dense, their Linears ignored
  cfg = json.loads((out / 'config.json').read_text())['quantization_config']
  assert cfg['ignore'] == ['model.layers.0.self_attn.q_proj', 'model.layers.1.mlp.up_proj',
                           'model.layers.1.self_attn.o_proj']
  err = rel_err(logits(model, mixed), torch_outputs(hf_load(out), TOKENS))
  assert err <= TOL
  _, loaded = models.from_pretrained(out)
  assert isinstance(core.paths.get(loaded, 'layers/1/mlp/down_proj/kernel'), core.Quantized)
  assert not core.is_compressed(core.paths.get(loaded, 'layers/0/attn/q_proj/kernel'))


def test_w4_g128_bytes_against_bf16_dense(tmp_path):
  model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_layers=2,
                                          num_heads=4, num_kv_heads=4, max_position_embeddings=64))
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda s: (0.02 * rng.randn(*s.shape)).astype(s.dtype), model.abstract_params())
  qparams = quantize_kernels(params, lambda p: dict(bits=4, group_size=128, symmetric=True))
  models.save_pretrained(tmp_path / 'dense', model, params, dtype=jnp.bfloat16)
  ct.export(model, qparams, tmp_path / 'w4', dtype=jnp.bfloat16)
  size = lambda d: sum(f.stat().st_size for f in d.glob('*.safetensors'))
  ratio = size(tmp_path / 'w4') / size(tmp_path / 'dense')
  print(f'W4 g128 compressed-tensors / bf16 dense bytes: {size(tmp_path / "w4")} / {size(tmp_path / "dense")} '
        f'= {ratio:.4f}')
  assert ratio <= 0.30


def edited(src, dst, fn):
  """A copy of checkpoint `src` whose quantization_config is fn(config) -> None (edited in place)."""
  shutil.copytree(src, dst)
  cfg = json.loads((dst / 'config.json').read_text())
  fn(cfg['quantization_config'])
  (dst / 'config.json').write_text(json.dumps(cfg))
  return dst


def test_unreadable_quantization_configs_name_the_field(llama, tmp_path):
  model, params = llama
  src = tmp_path / 'src'
  ct.export(model, quantize_kernels(params, lambda p: dict(bits=4, group_size=16, symmetric=False)), src)
  group = lambda q: next(iter(q['config_groups'].values()))
  cases = {  # the field the error must name: the edit that makes it unreadable
      'quant_method': lambda q: q.update(quant_method='awq'),
      'weights.actorder': lambda q: group(q)['weights'].update(actorder='group'),
      'input_activations.strategy': lambda q: group(q).update(input_activations={'num_bits': 8, 'type': 'int'}),
      'weights.type': lambda q: group(q)['weights'].update(type='nf4'),
      'weights.num_bits': lambda q: group(q)['weights'].update(type='float'),  # FP8 is 8 bits, these are 4
      'version': lambda q: (q.update(version='0.9.0'), group(q)['weights'].update(num_bits=3)),
  }
  for k, (field, fn) in enumerate(cases.items()):
    with pytest.raises(ValueError, match=rf'quantization_config\.(config_groups\.group_0\.)?{field} = '):
      models.from_pretrained(edited(src, tmp_path / f'case{k}', fn))

  w8a8 = tmp_path / 'w8a8'
  ct.export(model, round_inputs(quantize_kernels(params, lambda p: dict(bits=8, group_size=None))), w8a8)
  with pytest.raises(ValueError, match=r'input_activations\.strategy.*per token'):
    models.from_pretrained(edited(w8a8, tmp_path / 'per_tensor', lambda q: group(q)['input_activations'].update(
        strategy='tensor')))
  with pytest.raises(ValueError, match=r"weight' in 'model\.safetensors' holds codes in \[-12\d, 127\], outside the "
                                       r'4-bit range'):
    models.from_pretrained(edited(w8a8, tmp_path / 'bits', lambda q: group(q)['weights'].update(num_bits=4)))


def test_tensor_shapes_that_disagree_are_named(llama, tmp_path):
  model, params = llama
  ct.export(model, quantize_kernels(params, lambda p: dict(bits=4, group_size=16, symmetric=False)), tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  next(iter(cfg['quantization_config']['config_groups'].values()))['weights']['group_size'] = 8
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r'weight_scale.*model\.safetensors'):
    models.from_pretrained(tmp_path)
