"""LoRA adapters: the model is unchanged at first and only the factors train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress import core, lowrank, models
from tests.train.test_step import BATCH, MODEL, _run


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


@pytest.mark.slow
def test_lora_trains_only_adapters(params):
  adapted = lowrank.add_lora(params, jax.random.key(3), rank=4, alpha=8)
  np.testing.assert_allclose(MODEL.apply(adapted, BATCH['inputs']), MODEL.apply(params, BATCH['inputs']),
                             rtol=1e-5, atol=1e-6)  # b = 0 at the start
  state, h = _run(adapted, steps=5, trainable=lowrank.LORA_TRAINABLE)
  for path, leaf in core.flatten(state.params).items():
    before = core.paths.get(adapted, path)
    if isinstance(leaf, core.LoRA):
      np.testing.assert_array_equal(leaf.base, before.base)
      assert np.abs(leaf.lora_b).max() > 0
    else:
      np.testing.assert_array_equal(leaf, before)
  assert h[-1]['loss'] < h[0]['loss']
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))
  assert size(state.opt_state) < 0.5 * size(optax.adamw(1e-2).init(params))  # moments of the factors only


def test_bad_rank_is_named(params):
  with pytest.raises(ValueError, match='rank=0 must be >= 1'):
    lowrank.add_lora(params, jax.random.key(0), rank=0)


def _trained(adapted, key=7):
  """Adapters with non-zero b, as after training."""
  flat = core.flatten(adapted)
  keys = iter(jax.random.split(jax.random.key(key), len(flat)))
  return core.map_with_path(
      lambda p, w: core.LoRA(w.base, w.lora_a, 0.1 * jax.random.normal(next(keys), w.lora_b.shape), w.scale)
      if isinstance(w, core.LoRA) else w, adapted)


def test_merge_is_exact_for_dense_and_unmerge_checks_the_base(params):
  adapted = _trained(lowrank.add_lora(params, jax.random.key(3), rank=4))
  merged = lowrank.merge(adapted)
  for path, w in core.flatten(adapted).items():
    if isinstance(w, core.LoRA):
      ref = (np.asarray(w.base, np.float64) + w.scale * np.asarray(w.lora_a, np.float64)
             @ np.asarray(w.lora_b, np.float64))
      np.testing.assert_allclose(core.paths.get(merged, path), ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(MODEL.apply(merged, BATCH['inputs']), MODEL.apply(adapted, BATCH['inputs']),
                             rtol=1e-4, atol=1e-5)
  back = lowrank.unmerge(merged, adapted)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), back, adapted))
  other = _trained(lowrank.add_lora(params, jax.random.key(4), rank=4), key=8)
  with pytest.raises(ValueError, match='differs from the base the adapter was trained on'):
    lowrank.unmerge(merged, other)


def test_qlora_merges_into_dense_and_refuses_the_original_weights(params):
  sel = MODEL.select(params)
  nf4 = sel.map(lambda p, w: core.quantize(w, bits=4, group_size=32, fmt='nf4'), params)
  adapted = _trained(lowrank.add_lora(nf4, jax.random.key(3), rank=4))
  merged = lowrank.merge(adapted)
  assert all(not core.is_compressed(w) for w in core.flatten(merged).values())  # dense after merge
  np.testing.assert_allclose(MODEL.apply(merged, BATCH['inputs']), MODEL.apply(adapted, BATCH['inputs']),
                             rtol=1e-4, atol=1e-5)
  again = lowrank.merge_into(nf4, adapted)
  np.testing.assert_allclose(core.flatten(again)['layers/0/mlp/up_proj/kernel'],
                             core.flatten(merged)['layers/0/mlp/up_proj/kernel'], rtol=1e-6)
  with pytest.raises(ValueError, match="'layers/0/attn/k_proj/kernel': this weight differs"):
    lowrank.merge_into(params, adapted)  # the dense original is not the NF4 base it was trained on


@pytest.mark.slow
def test_lora_over_masked_and_quantized_bases_trains_only_factors(params):
  sel = MODEL.select(params)
  masked = sel.map(lambda p, w: core.Masked(w, jnp.abs(w) > jnp.median(jnp.abs(w))), params)
  for base in (masked, sel.map(lambda p, w: core.quantize(w, bits=4, group_size=32, fmt='nf4'), params)):
    adapted = lowrank.add_lora(base, jax.random.key(3), rank=4)
    state, h = _run(adapted, steps=3, trainable=lowrank.LORA_TRAINABLE)
    assert h[-1]['loss'] < h[0]['loss']
    before, after = core.flatten(adapted), core.flatten(state.params)
    for p, w in after.items():
      if isinstance(w, core.LoRA):
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), w.base, before[p].base))


def test_merged_model_exports_to_hf(params, tmp_path):
  transformers = pytest.importorskip('transformers')
  import torch
  adapted = _trained(lowrank.add_lora(params, jax.random.key(3), rank=4))
  models.save_pretrained(tmp_path, MODEL, lowrank.merge(adapted))
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    ref = hf(torch.asarray(np.asarray(BATCH['inputs'], np.int64))).logits.numpy()
  np.testing.assert_allclose(MODEL.apply(adapted, BATCH['inputs']), ref, rtol=1e-4, atol=1e-4)


def test_lowrank_recovery_trains_only_factors(params):
  lr = lowrank.compress(params, config=lowrank.SVDConfig(ranks=lowrank.RankRule(rank=4)))
  state, h = _run(lr, steps=3, trainable=lowrank.LOWRANK_TRAINABLE)
  assert h[-1]['loss'] < h[0]['loss']
  before = core.flatten(lr)
  for p, w in core.flatten(state.params).items():
    if isinstance(w, core.LowRank):
      assert not np.array_equal(w.a, before[p].a)
    else:
      np.testing.assert_array_equal(w, before[p])


def test_lora_on_a_path_that_matches_nothing_is_named(params):
  with pytest.raises(ValueError, match="include='nothing_here' .* match no weight"):
    lowrank.add_lora(params, jax.random.key(0), rules=core.Rules(include='nothing_here'))
  with pytest.raises(ValueError, match='rank=40 exceeds min'):
    lowrank.add_lora(params, jax.random.key(0), rank=40)


def test_merging_into_a_base_of_another_shape_is_named(params):
  adapted = _trained(lowrank.add_lora(params, jax.random.key(3), rank=4))
  flat = core.flatten(params)
  path = 'layers/0/mlp/up_proj/kernel'
  wide = core.paths.replace(params, {path: jnp.zeros((flat[path].shape[0], flat[path].shape[1] + 8))})
  with pytest.raises(ValueError, match=rf"'{path}': weight of shape \(32, 72\), but the adapter was trained on a "
                                       r'base of shape \(32, 64\)'):
    lowrank.merge_into(wide, adapted)
  with pytest.raises(KeyError, match="LoRA at 'layers/0/attn/k_proj/kernel', which params lack"):
    lowrank.merge_into({k: v for k, v in params.items() if k != 'layers'}, adapted)
  with pytest.raises(ValueError, match='holds no LoRA leaf'):
    lowrank.merge_into(params, params)
