"""A checkpoint made by llm-compressor itself (GPTQ W4A16 by its `oneshot`, committed with the script that made
it: tests/models/fixtures/make_llmcompressor_checkpoints.py) imports as `Quantized` leaves whose logits equal
transformers' load of the same directory, and exports back to the same tensors."""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file

from jaxcompress import core, models
from jaxcompress.models import compressed_tensors as ct
from tests.reference_models import relative_error as rel_err
from tests.reference_models import torch_outputs

pytest.importorskip('compressed_tensors.compressors')
torch = pytest.importorskip('torch')

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'llmcompressor_w4a16'
TOKENS = np.random.RandomState(0).randint(0, 97, (2, 12))


@pytest.fixture(scope='module')
def imported():
  return models.from_pretrained(str(FIXTURE))


def test_the_fixture_is_what_llm_compressor_writes():
  q = json.loads((FIXTURE / 'config.json').read_text())['quantization_config']
  assert q['quant_method'] == 'compressed-tensors' and q['format'] == 'pack-quantized'
  w = q['config_groups']['group_0']['weights']
  assert (w['num_bits'], w['group_size'], w['symmetric'], w['strategy']) == (4, 128, True, 'group')
  assert json.loads((FIXTURE / 'made_by.json').read_text())['llmcompressor'].startswith('0.14')


def test_it_imports_as_quantized_leaves_with_transformers_logits(imported):
  model, params = imported
  flat = core.flatten(params)
  kernels = [p for p in flat if p.startswith('layers/') and p.endswith('/kernel')]
  assert len(kernels) == 14
  for p in kernels:
    leaf = flat[p]
    assert isinstance(leaf, core.Quantized) and (leaf.bits, leaf.group_size, leaf.zero) == (4, 128, None), p
  assert not core.is_compressed(flat['lm_head/kernel'])  # llm-compressor's ignore list
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(FIXTURE), dtype=torch.float32).eval()
  ours = model.apply(params, jnp.asarray(TOKENS))
  assert rel_err(ours, torch_outputs(ref, TOKENS)) < 1e-5


def test_it_exports_back_to_the_same_tensors(imported, tmp_path):
  model, params = imported
  ct.export(model, params, tmp_path)
  theirs, ours = load_file(str(FIXTURE / 'model.safetensors')), load_file(str(tmp_path / 'model.safetensors'))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
