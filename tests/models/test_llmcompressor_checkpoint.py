"""Checkpoints made by llm-compressor itself (by its `oneshot`, committed with the script that made them:
tests/models/fixtures/make_llmcompressor_checkpoints.py) import as typed leaves whose logits equal transformers'
load of the same directory, and export back to the same tensors: GPTQ W4A16 (`Quantized` leaves), int8 weights
with static per-tensor asymmetric int8 input activations, and llm-compressor's FP8 scheme (e4m3 weights with one
scale per tensor, static per-tensor e4m3 inputs): `ActQuantized` leaves with their calibrated scale (and zero
point). A weight scale per tensor is read as that scale for each output channel, and written back so."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.torch import load_file

from jaxcompress import core, models
from jaxcompress.models import compressed_tensors as ct
from tests.reference_models import relative_error as rel_err
from tests.reference_models import torch_outputs

pytest.importorskip('compressed_tensors.compressors')
torch = pytest.importorskip('torch')

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
NAMES = ('llmcompressor_w4a16', 'llmcompressor_w8a8_static', 'llmcompressor_fp8')
TOKENS = np.random.RandomState(0).randint(0, 97, (2, 12))


@pytest.fixture(scope='module', params=NAMES)
def imported(request):
  return request.param, *models.from_pretrained(str(FIXTURES / request.param))


@pytest.mark.parametrize('name', NAMES)
def test_the_fixture_is_what_llm_compressor_writes(name):
  q = json.loads((FIXTURES / name / 'config.json').read_text())['quantization_config']
  group = q['config_groups']['group_0']
  w, a = group['weights'], group['input_activations']
  assert q['quant_method'] == 'compressed-tensors' and q['ignore'] == ['lm_head']
  if name == 'llmcompressor_w4a16':
    assert q['format'] == 'pack-quantized' and a is None
    assert (w['num_bits'], w['group_size'], w['symmetric'], w['strategy']) == (4, 128, True, 'group')
  elif name == 'llmcompressor_w8a8_static':
    assert q['format'] == 'int-quantized'
    assert (w['num_bits'], w['symmetric'], w['strategy']) == (8, True, 'channel')
    assert (a['num_bits'], a['symmetric'], a['strategy'], a['dynamic']) == (8, False, 'tensor', False)
  else:
    assert q['format'] == 'float-quantized' and w['type'] == a['type'] == 'float'
    assert (w['num_bits'], w['symmetric'], w['strategy']) == (8, True, 'tensor')
    assert (a['num_bits'], a['symmetric'], a['strategy'], a['dynamic']) == (8, True, 'tensor', False)
  assert json.loads((FIXTURES / name / 'made_by.json').read_text())['llmcompressor'].startswith('0.14')


def test_it_imports_as_typed_leaves_with_transformers_logits(imported):
  name, model, params = imported
  flat = core.flatten(params)
  kernels = [p for p in flat if p.startswith('layers/') and p.endswith('/kernel')]
  assert len(kernels) == 14
  for p in kernels:
    leaf = flat[p]
    if name == 'llmcompressor_w4a16':
      assert isinstance(leaf, core.Quantized) and (leaf.bits, leaf.group_size, leaf.zero) == (4, 128, None), p
    elif name == 'llmcompressor_w8a8_static':  # the calibrated input_scale and input_zero_point, 'full' int grid
      assert isinstance(leaf, core.ActQuantized) and leaf.static and leaf.grid == 'full', p
      assert leaf.zero is not None and -128 <= int(leaf.zero) <= 127 and float(leaf.scale) > 0, p
      assert isinstance(leaf.w, core.Quantized) and (leaf.w.bits, leaf.w.group_size, leaf.w.zero) == (8, None, None)
    else:  # e4m3 codes, the tensor's one weight scale for every channel, a static e4m3 input grid
      assert isinstance(leaf, core.ActQuantized) and leaf.static and leaf.grid == 'fp8' and leaf.zero is None, p
      assert leaf.w.fmt == 'fp8' and leaf.w.group_size is None and len(np.unique(np.asarray(leaf.w.scale))) == 1, p
  assert not core.is_compressed(flat['lm_head/kernel'])  # llm-compressor's ignore list
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(FIXTURES / name), dtype=torch.float32).eval()
  ours = model.apply(params, jnp.asarray(TOKENS))
  assert rel_err(ours, torch_outputs(ref, TOKENS)) < 1e-5


def test_it_exports_back_to_the_same_tensors(imported, tmp_path):
  name, model, params = imported
  ct.export(model, params, tmp_path)
  theirs = load_file(str(FIXTURES / name / 'model.safetensors'))
  ours = load_file(str(tmp_path / 'model.safetensors'))
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    mine = ours[key]
    assert mine.dtype == value.dtype, key
    if key.endswith('.weight_scale') and value.shape == (1,):  # per tensor: written as that scale per channel
      value = value.expand(mine.shape)
    as_bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    np.testing.assert_array_equal(as_bits(mine).numpy(), as_bits(value).numpy(), err_msg=key)
