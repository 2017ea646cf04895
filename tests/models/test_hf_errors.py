"""Bad checkpoints give errors that name the tensor, the file and the fix."""

import json
import re
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


def _sharded(hf_checkpoint, tmp_path):
  _, hf = hf_checkpoint('gpt2')
  hf.save_pretrained(str(tmp_path / 'ckpt'), max_shard_size='20KB')
  return tmp_path / 'ckpt'


def _write(name, text):
  return lambda path: (path / name).write_text(text)


def _edit_json(name, edit):
  def run(path):
    data = json.loads((path / name).read_text())
    edit(data)
    (path / name).write_text(json.dumps(data))
  return run


def _swap_shards(path):
  """Points one tensor of the index at a shard that does not hold it."""
  index = json.loads((path / 'model.safetensors.index.json').read_text())
  shards = sorted(set(index['weight_map'].values()))
  name = next(n for n, f in index['weight_map'].items() if f == shards[0])
  index['weight_map'][name] = shards[1]
  (path / 'model.safetensors.index.json').write_text(json.dumps(index))
  return name, shards


def _set_tensor(name, shape):
  def run(path):
    tensors = load_file(str(path / 'model.safetensors'))
    tensors[name] = np.zeros(shape, np.float32)
    save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  return run


# (name, damage to a copy of a gpt2 checkpoint, sharded?, regex the ValueError must match)
MALFORMED = [
    ('empty config', _write('config.json', ''), False, r"config\.json' is empty; expected a JSON object"),
    ('truncated config', lambda p: (p / 'config.json').write_text((p / 'config.json').read_text()[:40]), False,
     r"config\.json' is not valid JSON \(.*line \d+, column \d+\)"),
    ('config is a list', _write('config.json', '[1, 2]'), False,
     r"config\.json' holds a JSON list; expected a JSON object"),
    ('config without model_type', _edit_json('config.json', lambda c: c.pop('model_type')), False,
     r"config\.json: no model_type field; supported model types: .*'gpt2'"),
    ('config field of the wrong type', _edit_json('config.json', lambda c: c.update(n_head='four')), False,
     r"config\.json: transformers cannot build a gpt2 config from it [\s\S]*n_head[\s\S]*'four'"),
    ('index not JSON', _write('model.safetensors.index.json', '{"weight_map": {'), True,
     r"model\.safetensors\.index\.json' is not valid JSON"),
    ('index without weight_map', _edit_json('model.safetensors.index.json', lambda i: i.pop('weight_map')), True,
     r"model\.safetensors\.index\.json' has no weight_map; expected"),
    ('index weight_map a list', _edit_json('model.safetensors.index.json', lambda i: i.update(weight_map=[1])), True,
     r"model\.safetensors\.index\.json' has a weight_map of type list"),
    ('fused qkv of the wrong width', _set_tensor('transformer.h.0.attn.c_attn.weight', (32, 90)), False,
     r"'transformer\.h\.0\.attn\.c_attn\.weight' in 'model\.safetensors' has shape \[32, 90\]; config\.json "
     r'implies \[32, 96\] \(for layers/0/attn/q_proj/kernel \[32, 32\], layers/0/attn/k_proj/kernel'),
    ('fused qkv bias of the wrong width', _set_tensor('transformer.h.1.attn.c_attn.bias', (95,)), False,
     r"c_attn\.bias' in 'model\.safetensors' has shape \[95\]; config\.json implies \[96\]"),
]


@pytest.mark.parametrize('name,damage,sharded,message', MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_files_are_named(name, damage, sharded, message, hf_checkpoint, tmp_path):
  path = _sharded(hf_checkpoint, tmp_path) if sharded else _copy(hf_checkpoint('gpt2')[0], tmp_path / 'ckpt')
  damage(path)
  with pytest.raises(ValueError, match=message):
    models.from_pretrained(path)


def test_tensor_in_the_wrong_shard_is_named(hf_checkpoint, tmp_path):
  path = _sharded(hf_checkpoint, tmp_path)
  name, shards = _swap_shards(path)
  with pytest.raises(ValueError, match=(rf"index\.json' maps tensor '{re.escape(name)}' to '{shards[1]}', which does "
                                        rf"not hold it; it is in '{shards[0]}'")):
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
