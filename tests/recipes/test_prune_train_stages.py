"""Pruning-during-training stages: parsed and checked like any stage, and a tiny run of each gives `core.Masked`
block kernels that later stages take."""

import jax
import numpy as np
import pytest

from jaxcompress import core, models, pruning, recipes
from jaxcompress.data import pipeline

STEPS = 4
STAGES = {
    'gradual': f'gradual(sparsity=0.5, steps={STEPS}, learning_rate=1e-3, end_step=2, update_every=1)',
    'movement': f'movement(sparsity=0.5, steps={STEPS}, learning_rate=1e-3, end_step=2, update_every=1)',
    'set': f'set(sparsity=0.5, steps={STEPS}, learning_rate=1e-3, update_every=2)',
    'rigl': f'rigl(sparsity=0.5, steps={STEPS}, learning_rate=1e-3, update_every=2)',
    'soft_movement': f'soft_movement(penalty=0.1, steps={STEPS}, learning_rate=1e-3, score_learning_rate=0.05)',
}



def test_each_stage_parses_and_composes_with_later_stages():
  for name, text in STAGES.items():
    stages = recipes.parse(f'{text} > gptq(bits=4, group_size=32)')
    assert [s.name for s in stages] == [name, 'gptq'] and stages[0].method.trains
    assert stages[0].config.steps == STEPS
    assert recipes.plan(stages)[1]['blocks'] == frozenset({'masked'})
  assert recipes.parse('gradual')[0].config == pruning.GradualPruneConfig()
  assert recipes.parse('rigl')[0].config.init == 'magnitude'  # stages take pretrained weights


@pytest.mark.parametrize('text, needle', [
    ('gradual(steps=10, end_step=20)', 'gradual: end_step=20 must lie in [1, steps=10]'),
    ('movement(steps=10, begin_step=8, end_step=5)', 'begin_step=8 must lie in [0, end_step=5]'),
    ('rigl(update_every=0)', 'update_every=0 must be >= 1'),
    ('set(drop_fraction=1.5)', 'drop_fraction=1.5 must lie in (0, 1)'),
    ("rigl(init='lottery')", "init='lottery' must be 'magnitude'"),
    ('rigl(sparsity=1.0)', 'sparsity=1.0 is outside (0.0, 1.0)'),
    ('soft_movement(sparsity=0.5)', "unknown argument(s) ['sparsity']; valid: penalty"),
    ('soft_movement(penalty=-1.0)', 'penalty=-1.0 must be a finite number >= 0'),
    ('soft_movement(initial_score=-0.5)', 'initial_score=-0.5 must be above threshold=0.0'),
    ('gradual(kd_weight=2.0)', 'kd_weight=2.0 must lie in [0, 1]'),
    ('gptq(bits=4) > rigl(sparsity=0.5)', 'stage 2 rigl cannot run on blocks weights already quantized'),
    ('magnitude(sparsity=0.5) > gradual(sparsity=0.7)', 'already masked'),
])
def test_bad_arguments_fail_at_parse_time(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  # One block, 16 wide: each stage's run is mostly compiling its training step. Every block kernel is 16 x 16, so
  # the per-kernel work of a stage (scores, masks) compiles once for all seven, not once per shape.
  model = models.Llama(models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_layers=1,
                                          num_heads=2, num_kv_heads=2, max_position_embeddings=16))
  params = jax.jit(model.init)(jax.random.key(0))
  rows = np.random.default_rng(0).integers(0, 32, (8, 9)).astype(np.int32)
  ctx = recipes.Context(reference_model=model, reference=params, calib=({'tokens': rows[:8, :-1]},),
                        train=pipeline.LMBatches(sequences=rows, batch_size=4, seed=0), seed=0,
                        run_dir=str(tmp_path_factory.mktemp('stages')))
  return model, params, ctx


@pytest.mark.slow
@pytest.mark.parametrize('name', list(STAGES))
def test_a_tiny_run_gives_masked_block_kernels(tiny, name):
  model, params, ctx = tiny
  _, out = recipes.run(recipes.parse(STAGES[name]), ctx, model, params)
  sel = model.select(out)
  leaves = sel.get(out)
  assert leaves and all(isinstance(w, core.Masked) for w in leaves.values())
  assert not any(isinstance(w, core.Masked) for p, w in core.paths.flatten(out).items() if p not in sel)
  for w in leaves.values():  # pruned entries are zero in the stored value, the mask says which
    assert (np.asarray(w.value)[~np.asarray(w.mask)] == 0).all()
  reached = pruning.sparsity_of(out, sel)
  if name == 'soft_movement':
    assert 0.0 < reached < 1.0  # no target: the penalty sets it
  else:
    kept = sum(int(np.asarray(w.mask).sum()) for w in leaves.values())
    assert abs(1 - kept / sum(w.size for w in leaves.values()) - 0.5) < 0.01
    assert abs(reached - 0.5) < 0.01
  dense = np.asarray(params['layers'][0]['mlp']['up_proj']['kernel'])
  got = np.asarray(out['layers'][0]['mlp']['up_proj']['kernel'].materialize())
  assert not np.array_equal(got, dense * (got != 0))  # the kept weights trained, not just masked
  assert np.isfinite(np.asarray(jax.jit(model.apply)(core.materialize_tree(out), ctx.calib[0]['tokens']))).all()
