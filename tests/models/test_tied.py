"""A model with shared (tied) storage end to end: block by block, quantizing the tied weights, accounting,
`core.serialize`, Hugging Face export, and FSDP sharding on 8 virtual devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models
from jaxcompress.core import serialize, stats
from tests.core.test_open_leaf import run_on_8_devices

VOCAB = 64
UP = [f'layers/{i}/mlp/up_proj/kernel' for i in range(2)]
O = [f'layers/{i}/attn/o_proj/kernel' for i in range(2)]


def _model() -> tuple[models.Llama, dict]:
  """A 2-layer Llama whose up_proj and o_proj kernels are each one tensor shared by both layers."""
  model = models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  params = model.init(jax.random.key(0))
  return model, core.tie(core.tie(params, UP, name='up'), O, name='o')


def _tokens(batch: int = 2) -> jax.Array:
  return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, size=(batch, 7)), jnp.int32)


def _quantize(params: dict, model: models.Llama) -> dict:
  return model.select(params).map(lambda _, w: core.quantize(w, bits=4, group_size=16), params)


def test_blocks_run_on_tied_parameters():
  model, params = _model()
  tokens = _tokens()
  h = model.embed(params, tokens)
  ctx = model.context(tokens)
  for i in range(model.num_layers(params)):
    h = model.block(model.block_params(params, i), h, ctx)
  np.testing.assert_allclose(np.asarray(model.head(params, h)), np.asarray(model.apply(params, tokens)),
                             rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='block_params'):
    model.block(params['layers'][0], h, ctx)


def test_quantizing_tied_weights_quantizes_each_storage_once():
  model, params = _model()
  quantized = _quantize(params, model)
  store = quantized[core.SHARED]
  assert sorted(store) == ['o', 'up'] and all(isinstance(w, core.Quantized) for w in store.values())
  for path in UP + O:
    assert isinstance(core.paths.get(quantized, path), core.Shared)  # still tied
  # The two storages, plus q, k, v, gate and down of each layer.
  assert sum(isinstance(w, core.Quantized) for w in core.flatten(quantized).values()) == 2 + 2 * 5
  # Same numbers as untying first and quantizing every place.
  untied = _quantize(core.resolve(params), model)
  tokens = _tokens()
  np.testing.assert_array_equal(np.asarray(model.apply(quantized, tokens)), np.asarray(model.apply(untied, tokens)))
  # Stored once: the tied tree writes two shared tensors' bytes less than the untied one.
  per_place = core.disk_bytes(store['up']) + core.disk_bytes(store['o'])
  assert stats.totals(untied).disk - stats.totals(quantized).disk == per_place
  assert stats.totals(quantized).params == stats.totals(untied).params


def test_serialize_and_export_round_trip(tmp_path):
  model, params = _model()
  quantized = _quantize(params, model)
  tokens = _tokens()
  logits = np.asarray(model.apply(quantized, tokens))
  path = tmp_path / 'tied.jc.safetensors'
  assert serialize.save(path, quantized) == stats.totals(quantized).disk
  back = serialize.load(path)
  assert isinstance(back[core.SHARED]['up'], core.Quantized) and isinstance(back['layers'][1]['mlp']['up_proj']['kernel'],
                                                                            core.Shared)
  np.testing.assert_array_equal(np.asarray(model.apply(back, tokens)), logits)
  models.save_pretrained(tmp_path / 'hf', model, quantized)
  _, loaded = models.from_pretrained(tmp_path / 'hf')
  np.testing.assert_allclose(np.asarray(model.apply(loaded, tokens)), logits, rtol=1e-5, atol=1e-5)
  import torch
  import transformers
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'hf')).eval()
  with torch.no_grad():
    theirs = ref(torch.tensor(np.asarray(tokens))).logits.float().numpy()
  np.testing.assert_allclose(theirs, logits, rtol=1e-4, atol=1e-4)


def fsdp_main() -> None:
  """Run with 8 virtual devices: shared storage takes its users' specs and the sharded model matches."""
  from jax.sharding import PartitionSpec as P

  from jaxcompress.train import sharding
  model, params = _model()
  mesh = sharding.make_mesh(2, 4, 1)
  rules = model.sharding_rules()
  specs = sharding.param_specs(params, mesh, rules)
  # up_proj is [in, out] -> ('fsdp', 'tensor'); o_proj -> ('tensor', 'fsdp'): the storage follows its users.
  assert specs['_shared/up'] == specs['layers/0/mlp/gate_proj/kernel'] == P('fsdp', None), specs['_shared/up']
  assert specs['_shared/o'] == P(None, 'fsdp'), specs['_shared/o']
  quantized = _quantize(params, model)
  qspecs = sharding.param_specs(quantized, mesh, rules)
  assert qspecs['_shared/o/codes'] == P(None, 'fsdp') and qspecs['_shared/o/scale'] == P(None, 'fsdp')
  tokens = _tokens(8)
  batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
  loss = lambda p, t: jnp.mean(jax.nn.log_softmax(model.apply(p, t)) ** 2)
  for tree, tree_specs in ((params, specs), (quantized, qspecs)):
    placed = jax.device_put(tree, sharding.tree_shardings(tree, tree_specs, mesh))
    shard = placed[core.SHARED]['o'] if tree is params else placed[core.SHARED]['o'].codes
    assert shard.addressable_shards[0].data.shape[1] == shard.shape[1] // 4  # split over fsdp
    got = jax.jit(loss)(placed, batch)
    # the references on one device, compiled as one program each (op by op, every op would compile apart)
    np.testing.assert_allclose(float(got), float(jax.jit(loss)(tree, tokens)), rtol=1e-5)
  grads = jax.jit(jax.grad(loss))(jax.device_put(params, sharding.tree_shardings(params, specs, mesh)), batch)
  expected = jax.jit(jax.grad(loss))(params, tokens)
  for name in ('up', 'o'):
    np.testing.assert_allclose(np.asarray(grads[core.SHARED][name]), np.asarray(expected[core.SHARED][name]),
                               rtol=1e-4, atol=1e-7)
  print('fsdp ok')


@pytest.mark.slow
@pytest.mark.subprocess
def test_fsdp_on_8_devices():
  assert 'fsdp ok' in run_on_8_devices('tests.models.test_tied', 'fsdp_main')
