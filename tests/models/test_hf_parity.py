"""Our fp32 logits against transformers' torch implementation, and export back to transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxcompress import core, models
from tests.reference_models import ALL_KINDS, CAUSAL_KINDS, VOCAB
from tests.reference_models import relative_error as rel_err
from tests.reference_models import torch_outputs as torch_logits

TOKENS = np.random.RandomState(0).randint(0, VOCAB, (2, 12))
TOL = 1e-6  # fp32 relative error; observed 1.4e-7 to 1.8e-7


@pytest.mark.parametrize('kind', ALL_KINDS)
def test_logits_match_transformers(kind, hf_checkpoint):
  path, hf = hf_checkpoint(kind)
  model, params = models.from_pretrained(path)
  ours = model.apply(params, jnp.asarray(TOKENS))
  assert rel_err(ours, torch_logits(hf, TOKENS)) <= TOL


def test_family_and_config_read_from_checkpoint(hf_checkpoint):
  expected = {'llama': (models.Llama, 2), 'mistral': (models.Llama, 2), 'qwen2': (models.Llama, 2),
              'gpt2': (models.GPT2, 4), 'bert': (models.Bert, 4)}
  for kind, (cls, kv_heads) in expected.items():
    model = models.load_model(hf_checkpoint(kind)[0])
    assert type(model) is cls
    if cls is models.Llama:
      assert model.config.num_kv_heads == kv_heads
  assert models.load_model(hf_checkpoint('mistral')[0]).config.sliding_window == 4
  assert models.load_model(hf_checkpoint('qwen2')[0]).config.qkv_bias
  assert dict(models.load_model(hf_checkpoint('llama')[0]).config.rope)['rope_type'] == 'llama3'


@pytest.mark.parametrize('kind', ['llama', 'gpt2', 'bert'])
def test_padding_mask_matches_transformers(kind, hf_checkpoint):
  path, hf = hf_checkpoint(kind)
  model, params = models.from_pretrained(path)
  mask = np.ones_like(TOKENS)
  mask[1, 8:] = 0  # right padding
  ours = np.asarray(model.apply(params, jnp.asarray(TOKENS), attention_mask=jnp.asarray(mask)))
  ref = torch_logits(hf, TOKENS, mask)
  keep = mask.astype(bool)
  assert rel_err(ours[keep], ref[keep]) <= TOL


@pytest.mark.parametrize('kind', ALL_KINDS)
def test_export_round_trips_to_identical_logits(kind, hf_checkpoint, tmp_path):
  path, hf = hf_checkpoint(kind)
  model, params = models.from_pretrained(path)
  models.save_pretrained(tmp_path, model, params)
  cls = type(hf)
  reloaded = cls.from_pretrained(str(tmp_path)).eval()
  np.testing.assert_array_equal(torch_logits(reloaded, TOKENS), torch_logits(hf, TOKENS))


def test_export_of_compressed_params_matches_our_logits(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint('llama')
  model, params = models.from_pretrained(path)

  def compress(p, w):
    if 'mlp' in p:
      return core.Masked(w, jnp.abs(w) > jnp.median(jnp.abs(w)))
    return core.quantize(w, bits=4, group_size=16)

  small = core.select(params).map(compress, params)
  models.save_pretrained(tmp_path, model, small)
  reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
  ours = model.apply(small, jnp.asarray(TOKENS))
  assert rel_err(ours, torch_logits(reloaded, TOKENS)) <= TOL


def test_sharded_checkpoints_load_and_export(hf_checkpoint, tmp_path):
  _, hf = hf_checkpoint('qwen2')
  hf.save_pretrained(str(tmp_path / 'in'), max_shard_size='20KB')
  assert (tmp_path / 'in' / 'model.safetensors.index.json').exists()
  model, params = models.from_pretrained(tmp_path / 'in')
  assert rel_err(model.apply(params, jnp.asarray(TOKENS)), torch_logits(hf, TOKENS)) <= TOL
  models.save_pretrained(tmp_path / 'out', model, params, max_shard_bytes=20_000)
  shards = sorted(p.name for p in (tmp_path / 'out').glob('model-*.safetensors'))
  assert len(shards) > 1
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  np.testing.assert_array_equal(torch_logits(reloaded, TOKENS), torch_logits(hf, TOKENS))


def test_load_casts_dtype_and_places_each_tensor(hf_checkpoint):
  path, _ = hf_checkpoint('gpt2')
  seen = []
  model, params = models.from_pretrained(path, dtype=jnp.bfloat16,
                                         place=lambda p, x: seen.append(p) or jax.device_put(x))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert sorted(seen) == sorted(core.flatten(params))
  # GPT-2's fused c_attn becomes three kernels.
  assert {'layers/0/attn/q_proj/kernel', 'layers/0/attn/k_proj/kernel'} <= set(seen)


@pytest.mark.parametrize('kind', CAUSAL_KINDS)
def test_bf16_forward_stays_close(kind, hf_checkpoint):
  path, hf = hf_checkpoint(kind)
  model, params = models.from_pretrained(path, dtype=jnp.bfloat16)
  ours = model.apply(params, jnp.asarray(TOKENS)).astype(jnp.float32)
  assert rel_err(ours, torch_logits(hf, TOKENS)) <= 3e-2
