"""Model-level one-shot pruning through the sequential calibration driver on a tiny Llama."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import calibration, core, models, pruning

LLAMA = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))


def batches(n=2, seed=0):
  rs = np.random.RandomState(seed)
  return [rs.randint(0, 64, (2, 16)).astype(np.int32) for _ in range(n)]


@pytest.fixture(scope='module')
def params():
  return LLAMA.init(jax.random.key(0))


def test_first_block_equals_the_layer_solvers_on_dense_statistics(params):
  data = batches()
  stats = calibration.calibrate(LLAMA, params, data, calibration.combine(h=calibration.hessian(),
                                                                         n=calibration.column_norms()))
  _, wanda = pruning.wanda(LLAMA, params, data, config=pruning.WandaConfig(per_group=False))
  _, sgpt = pruning.sparsegpt(LLAMA, params, data, config=pruning.SparseGPTConfig(per_group=False, block_size=16))
  flat, w_flat, s_flat = core.flatten(params), core.flatten(wanda), core.flatten(sgpt)
  for path in ('layers/0/attn/q_proj/kernel', 'layers/0/mlp/down_proj/kernel'):
    want = pruning.wanda_from_norms(flat[path], stats[path]['n']['sq_norm'])
    np.testing.assert_array_equal(np.asarray(w_flat[path].mask), np.asarray(want.mask))
  # without per_group, every kernel of block 0 sees the dense model's inputs
  for path in ('layers/0/attn/q_proj/kernel', 'layers/0/mlp/down_proj/kernel'):
    want = pruning.sparsegpt_from_hessian(flat[path], stats[path]['h']['xtx'], block_size=16)
    np.testing.assert_array_equal(np.asarray(s_flat[path].mask), np.asarray(want.mask))
    np.testing.assert_allclose(np.asarray(s_flat[path].value), np.asarray(want.value), rtol=1e-5, atol=1e-6)
  for out in (wanda, sgpt):
    sel = core.select(out)
    assert all(k == 'Masked' for k in sel.kinds) and len(sel) == 14
    assert pruning.sparsity_of(out) == 0.5
  held = jnp.asarray(batches(1, seed=5)[0])
  assert np.isfinite(np.asarray(LLAMA.apply(sgpt, held))).all()


def test_nm_exclusions_and_overrides(params):
  _, out = pruning.sparsegpt(LLAMA, params, batches(1), config=pruning.SparseGPTConfig(
      pattern='2:4', rules=core.Rules(exclude=(r'layers/1/',)), block_size=16))
  flat = core.flatten(out)
  assert isinstance(flat['layers/0/mlp/up_proj/kernel'], core.Masked)
  assert not isinstance(flat['layers/1/mlp/up_proj/kernel'], core.Masked)
  mask = np.asarray(flat['layers/0/mlp/up_proj/kernel'].mask)
  assert (mask.reshape(8, 4, 48).sum(1) == 2).all()
  _, out = pruning.wanda(LLAMA, params, batches(1), config=pruning.WandaConfig(overrides=((r'down_proj', 0.75),)))
  flat = core.flatten(out)
  assert flat['layers/1/mlp/down_proj/kernel'].sparsity() == 0.75
  assert flat['layers/1/mlp/up_proj/kernel'].sparsity() == 0.5


def test_bad_calibration_and_selection_are_refused(params):
  with pytest.raises(ValueError, match='matches no kernel'):
    pruning.wanda(LLAMA, params, batches(1), config=pruning.WandaConfig(rules=core.Rules(include='no_such_layer')))
  with pytest.raises(ValueError, match='needs calibration batches'):
    pruning.sparsegpt(LLAMA, params, [], config=pruning.SparseGPTConfig())
  broken = jax.tree.map(lambda x: x, params)
  table = broken['embed']['tokens']['embedding']
  broken['embed']['tokens']['embedding'] = table.at[3, 0].set(jnp.inf)
  tokens = np.full((2, 8), 3, np.int32)
  with pytest.raises(ValueError, match='NaN or inf'):
    pruning.sparsegpt(LLAMA, broken, [tokens], config=pruning.SparseGPTConfig())
  with pytest.raises(ValueError, match='NaN or inf'):
    pruning.wanda(LLAMA, broken, [tokens], config=pruning.WandaConfig())
  with pytest.raises(ValueError, match='sparsity'):
    pruning.wanda(LLAMA, params, batches(1), config=pruning.WandaConfig(sparsity=1.0))
