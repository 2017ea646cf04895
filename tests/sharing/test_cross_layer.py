"""Cross-layer sharing: groups, averaged storage counted once, scan, per-layer LoRA deltas, tied embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models, sharing

MODEL = models.Llama(models.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=4,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 48, (2, 9)).astype(np.int32))


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


def test_groups():
  assert sharing.all_blocks(4) == ((0, 1, 2, 3),)
  assert sharing.consecutive_groups(5, 2) == ((0, 1), (2, 3), (4,))
  with pytest.raises(ValueError, match='k=0'):
    sharing.consecutive_groups(4, 0)


def test_shared_storage_is_the_group_mean_and_counted_once(params, tmp_path):
  shared = sharing.share_blocks(params, sharing.consecutive_groups(4, 2))
  store = shared[core.SHARED]
  for g in ((0, 1), (2, 3)):
    ref = np.mean([np.asarray(params['layers'][i]['mlp']['up_proj']['kernel'], np.float64) for i in g], axis=0)
    np.testing.assert_allclose(store[f'g{g[0]}-{g[-1]}:mlp/up_proj/kernel'], ref, rtol=1e-6)
    assert isinstance(shared['layers'][g[1]]['attn']['q_proj']['kernel'], core.Shared)
  block = sum(x.size for x in jax.tree.leaves(params['layers'][0]))
  dense, tied = core.stats.totals(params), core.stats.totals(shared)
  assert tied.params == dense.params  # every layer still uses its weights
  assert tied.stored == dense.stored - 2 * block  # two blocks' storage saved
  assert tied.flops == dense.flops
  assert core.serialize.save(tmp_path / 's.safetensors', shared) == tied.disk == dense.disk - 2 * block * 4
  back = core.serialize.load(tmp_path / 's.safetensors')
  np.testing.assert_array_equal(MODEL.apply(back, TOKENS), MODEL.apply(shared, TOKENS))
  # The checkpointed tree holds each storage once: references carry no arrays.
  assert len(jax.tree.leaves(shared)) == len(jax.tree.leaves(params)) - 2 * len(jax.tree.leaves(params['layers'][0]))


def test_scan_runs_a_shared_model(params):
  shared = sharing.share_blocks(params, sharing.all_blocks(4))
  np.testing.assert_allclose(MODEL.apply(shared, TOKENS, scan=True), MODEL.apply(shared, TOKENS),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(MODEL.apply(core.resolve(shared), TOKENS), MODEL.apply(shared, TOKENS), rtol=1e-6)


def test_similarity_groups_find_near_copies():
  base = jax.jit(MODEL.init)(jax.random.key(1))
  noise = jax.jit(MODEL.init)(jax.random.key(2))
  layers = dict(base['layers'])
  layers[2] = jax.tree.map(lambda a, n: a + 0.05 * n, base['layers'][0], noise['layers'][0])
  layers[3] = jax.tree.map(lambda a, n: a + 0.05 * n, base['layers'][1], noise['layers'][1])
  p = {**base, 'layers': layers}
  sim = sharing.similarity(p)
  flat = [np.concatenate([np.asarray(w, np.float64).ravel() for k, w in sorted(core.flatten(p['layers'][i]).items())
                          if k.endswith('kernel')]) for i in range(4)]
  np.testing.assert_allclose(sim[0, 2], flat[0] @ flat[2] / np.linalg.norm(flat[0]) / np.linalg.norm(flat[2]),
                             rtol=1e-10)
  for method in ('agglomerative', 'greedy'):
    assert sharing.similarity_groups(p, 2, method=method) == ((0, 2), (1, 3))


def test_lora_deltas_over_shared_storage_resolve_jit_and_grad(params):
  shared = sharing.add_deltas(sharing.share_blocks(params, sharing.all_blocks(4)), jax.random.key(1), rank=2)
  w = shared['layers'][1]['mlp']['up_proj']['kernel']
  assert isinstance(w, core.LoRA) and isinstance(w.base, core.Shared)
  np.testing.assert_allclose(jax.jit(MODEL.apply)(shared, TOKENS), MODEL.apply(
      sharing.share_blocks(params, sharing.all_blocks(4)), TOKENS), rtol=1e-5, atol=1e-6)  # b = 0 at first
  loss = lambda p: jnp.mean(MODEL.apply(p, TOKENS) ** 2)
  g = jax.jit(jax.grad(loss))(shared)
  up = 'g0-3:mlp/up_proj/kernel'
  assert np.abs(g[core.SHARED][up]).max() > 0
  assert all(np.abs(g['layers'][i]['mlp']['up_proj']['kernel'].lora_b).max() > 0 for i in range(4))
  # The storage's gradient is the sum of its four uses' gradients (checked against the untied tree).
  untied = core.resolve(core.materialize_tree(core.resolve(shared)))
  gu = jax.jit(jax.grad(loss))(untied)
  np.testing.assert_allclose(g[core.SHARED][up],
                             sum(gu['layers'][i]['mlp']['up_proj']['kernel'] for i in range(4)), rtol=1e-4,
                             atol=1e-7)
  s = core.stats.totals(shared)
  assert s.stored == core.stats.totals(sharing.share_blocks(params, sharing.all_blocks(4))).stored + sum(core.stored_params(x.lora_a) + core.stored_params(x.lora_b)
               for x in core.flatten(shared).values() if isinstance(x, core.LoRA))


def test_tie_embeddings_of_an_untied_model(params):
  tied_model, tied = sharing.tie_embeddings(MODEL, params)
  assert tied_model.config.tie_embeddings and 'lm_head' not in tied
  ref = (np.asarray(params['embed']['tokens']['embedding'], np.float64)
         + np.asarray(params['lm_head']['kernel'], np.float64).T) / 2
  np.testing.assert_allclose(tied['embed']['tokens']['embedding'], ref, rtol=1e-6)
  logits = tied_model.apply(tied, TOKENS)
  assert logits.shape == (2, 9, 48) and np.all(np.isfinite(logits))
  assert core.stats.totals(tied).stored == core.stats.totals(params).stored - 32 * 48
  with pytest.raises(ValueError, match='already tied'):
    sharing.tie_embeddings(tied_model, tied)


def test_bad_groups_are_named(params):
  with pytest.raises(ValueError, match=r'block 7 in group \(0, 7\) does not exist; the model has blocks 0..3'):
    sharing.share_blocks(params, [(0, 7)])
  with pytest.raises(ValueError, match='appears in two groups'):
    sharing.share_blocks(params, [(0, 1), (1, 2)])
  narrow = dict(params['layers'])
  narrow[2] = {**narrow[2], 'mlp': {k: {'kernel': v['kernel'][:, :16] if k != 'down_proj' else v['kernel'][:16]}
                                    for k, v in narrow[2]['mlp'].items()}}
  with pytest.raises(ValueError, match=r"'mlp/down_proj/kernel' has shape \(64, 32\) in block 0 but \(16, 32\)"):
    sharing.share_blocks({**params, 'layers': narrow}, [(0, 2)])
  with pytest.raises(ValueError, match='no Shared reference matches'):
    sharing.add_deltas(params, jax.random.key(0))
