"""Bad checkpoints give errors that name the tensor, the file and the fix."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcompress import models


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_refuses_pickle_checkpoints(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint('gpt2')[0], tmp_path / 'ckpt')
  (path / 'model.safetensors').unlink()
  (path / 'pytorch_model.bin').write_bytes(b'not loaded')
  with pytest.raises(ValueError, match=r'pickle.*pytorch_model\.bin[\s\S]*safe_serialization=True'):
    models.from_pretrained(path)


def test_unknown_model_type(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint('gpt2')[0], tmp_path / 'ckpt')
  cfg = json.loads((path / 'config.json').read_text())
  cfg['model_type'] = 't5'
  (path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"model_type 't5' is not supported.*'gpt2'.*'llama'"):
    models.from_pretrained(path)


def test_missing_tensor_names_tensor_and_shape(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint('llama')[0], tmp_path / 'ckpt')
  tensors = load_file(str(path / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*layers/1/mlp/up_proj/kernel \[32, 48\]"):
    models.from_pretrained(path)


def test_misshapen_tensor_names_expected_shape(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint('bert')[0], tmp_path / 'ckpt')
  tensors = load_file(str(path / 'model.safetensors'))
  tensors['encoder.layer.0.intermediate.dense.weight'] = np.zeros((40, 32), np.float32)
  save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\[40, 32\].*implies \[48, 32\].*layers/0/mlp/up_proj/kernel \[32, 48\]"):
    models.from_pretrained(path)


def test_truncated_file(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint('qwen2')[0], tmp_path / 'ckpt')
  data = (path / 'model.safetensors').read_bytes()
  (path / 'model.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match='truncated'):
    models.from_pretrained(path)


def test_missing_shard_listed_in_index(hf_checkpoint, tmp_path):
  _, hf = hf_checkpoint('gpt2')
  hf.save_pretrained(str(tmp_path / 'ckpt'), max_shard_size='20KB')
  shard = sorted((tmp_path / 'ckpt').glob('model-*.safetensors'))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    models.from_pretrained(tmp_path / 'ckpt')


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    models.from_pretrained(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'model.safetensors').write_bytes(b'')
  with pytest.raises((FileNotFoundError, ValueError), match='config.json|truncated'):
    models.from_pretrained(tmp_path / 'empty')


def test_export_refuses_non_uniform_layers(hf_checkpoint, tmp_path):
  model, params = models.from_pretrained(hf_checkpoint('llama')[0])
  mlp = params['layers'][0]['mlp']
  narrowed = {**params, 'layers': {**params['layers'], 0: {**params['layers'][0], 'mlp': {
      'gate_proj': {'kernel': mlp['gate_proj']['kernel'][:, :40]},
      'up_proj': {'kernel': mlp['up_proj']['kernel'][:, :40]},
      'down_proj': {'kernel': mlp['down_proj']['kernel'][:40]}}}}}
  assert model.apply(narrowed, jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 97)  # it still runs
  with pytest.raises(ValueError, match=r"layers/0/mlp/down_proj/kernel.*\[40, 32\].*\[48, 32\]"):
    models.save_pretrained(tmp_path / 'out', model, narrowed)


def test_bad_tokens():
  model = models.GPT2(models.GPT2Config(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, n_positions=8))
  params = model.init(jax.random.key(0))
  with pytest.raises(ValueError, match='integer array'):
    model.apply(params, jnp.zeros((1, 4), jnp.float32))
  with pytest.raises(ValueError, match='attention_mask shape'):
    model.apply(params, jnp.zeros((1, 4), jnp.int32), attention_mask=jnp.ones((1, 5)))
