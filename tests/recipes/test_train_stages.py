"""Training-time quantization and distillation stages: qat, lsq, llm_qat, gkd, seq_kd, drop_layers and the
TinyBERT/MiniLM options of distill, run in recipes on a tiny random Llama, composed with pruning."""

import json

import jax
import numpy as np
import pytest

from jaxcompress import core, distillation, quantization, recipes
from jaxcompress.data import pipeline
from jaxcompress.train import recovery

NEW = ('qat', 'lsq', 'llm_qat', 'gkd', 'seq_kd', 'drop_layers')



def _spec(num_layers):
  from jaxcompress import models
  return models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=num_layers,
                                         num_heads=4, num_kv_heads=2, max_position_embeddings=32))


def _llama(num_layers):
  model = _spec(num_layers)
  return model, jax.jit(model.init)(jax.random.key(0))


def _setup(tmp_path_factory, num_layers):
  model, params = _llama(num_layers)
  rows = np.random.default_rng(0).integers(0, 64, (48, 17)).astype(np.int32)
  train = pipeline.LMBatches(sequences=rows[:32], batch_size=8, seed=0)
  ctx = recipes.Context(reference_model=model, reference=params, calib=({'tokens': rows[32:, :-1]},), train=train,
                        run_dir=str(tmp_path_factory.mktemp('stages')))
  return model, params, ctx


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  return _setup(tmp_path_factory, 1)  # one block: each training stage compiles in a few seconds


@pytest.fixture(scope='module')
def setup2(tmp_path_factory):
  return _setup(tmp_path_factory, 2)


def _run(text, ctx, model, params):
  return recipes.run(recipes.parse(text), ctx, model, params)


def test_every_new_stage_is_listed_with_its_paper_and_fields():
  text = recipes.describe()
  for name in NEW:
    assert f'  {name}(' in text and recipes.get(name).paper in text
  assert 'act_bits=None' in text and 'hidden_weight=0.0' in text and 'fraction=0.5' in text


@pytest.mark.slow
def test_pruning_then_qat_keeps_masks_and_ends_in_trained_quantized_leaves_then_distill(setup):
  model, params, ctx = setup
  recipes.parse('sparsegpt(sparsity=0.5) > qat(bits=4, group_size=64, act_bits=8, steps=2) > '
                'distill(steps=1, hidden_weight=1.0)')  # the whole chain plans
  _, sparse = _run('magnitude(sparsity=0.5)', ctx, model, params)  # any pruning's masks (no calibration here)
  _, q = _run('qat(bits=4, group_size=64, act_bits=8, steps=3, learning_rate=0.01)', ctx, model, sparse)
  untrained = quantization.finalize_qat(sparse, model.selection_rules(include=(r'down_proj/kernel$',)), bits=4,
                                        group_size=64)
  for path in model.select(params).paths:
    leaf, before = core.paths.get(q, path), core.paths.get(sparse, path)
    assert isinstance(leaf, quantization.ActQuantized) and leaf.bits == 8
    inner = leaf.w
    assert isinstance(inner, core.Masked) and isinstance(inner.value, core.Quantized)
    np.testing.assert_array_equal(np.asarray(inner.mask), np.asarray(before.mask))  # the pruning pattern stays
    assert inner.value.bits == 4 and inner.value.group_size == (64 if 'down_proj' in path else None)
    assert (np.asarray(inner.materialize())[~np.asarray(before.mask)] == 0).all()
  # Training moved the weights: the codes differ from the same grid on the untrained sparse weights.
  down = 'layers/0/mlp/down_proj/kernel'
  assert not np.array_equal(np.asarray(core.paths.get(q, down).w.materialize()),
                            np.asarray(core.paths.get(untrained, down).materialize()))
  _, out = _run('distill(steps=1, hidden_weight=1.0)', ctx, model, q)
  assert isinstance(core.paths.get(out, down), quantization.ActQuantized)
  logits = np.asarray(jax.jit(model.apply)(out, ctx.calib[0]['tokens']))
  assert np.isfinite(logits).all()


def test_magnitude_then_lsq_learns_steps_under_the_mask(setup):
  model, params, ctx = setup
  _, sparse = _run('magnitude(sparsity=0.5)', ctx, model, params)
  _, out = _run('lsq(bits=3, steps=3, learning_rate=0.01)', ctx, model, sparse)
  path = 'layers/0/attn/o_proj/kernel'
  leaf, before = core.paths.get(out, path), core.paths.get(sparse, path)
  assert isinstance(leaf, core.Masked) and isinstance(leaf.value, core.Quantized) and leaf.value.bits == 3
  np.testing.assert_array_equal(np.asarray(leaf.mask), np.asarray(before.mask))
  init = quantization.add_lsq({'k': before.materialize()}, core.Rules(include=('k',)), bits=3)['k']
  assert not np.allclose(np.asarray(leaf.value.scale).ravel(), np.exp(np.asarray(init.log_step)).ravel())


@pytest.mark.slow
def test_llm_qat_then_on_policy_gkd(setup):
  model, params, ctx = setup
  _, q = _run('llm_qat(bits=4, group_size=16, steps=2)', ctx, model, params)
  assert all(isinstance(core.paths.get(q, p), core.Quantized) for p in model.select(params).paths)
  _, out = _run('gkd(fraction=1.0, steps=2, prompt_len=4, learning_rate=0.01)', ctx, model, q)
  records = [json.loads(s) for s in open(f'{ctx.run_dir}/stages/gkd/metrics.jsonl')]
  assert any(r.get('train/on_policy') == 1.0 for r in records), records  # every batch was sampled from the student
  scale = lambda p: np.asarray(core.paths.get(p, 'layers/0/mlp/up_proj/kernel').scale)
  assert not np.array_equal(scale(out), scale(q)) and np.isfinite(scale(out)).all()


def test_drop_layers_then_sequence_level_kd(setup2):
  model, params, ctx = setup2
  small_model, small = _run('drop_layers(layers=(1,))', ctx, model, params)
  assert small_model.config.num_layers == 1
  np.testing.assert_array_equal(np.asarray(small['layers'][0]['mlp']['up_proj']['kernel']),
                                np.asarray(params['layers'][1]['mlp']['up_proj']['kernel']))
  text = distillation.teacher_text(ctx, recipes.parse('seq_kd(rows=8, prompt_len=4)')[0].config)
  assert text.shape == (8, 17) and text.dtype == np.int32 and (text >= 0).all() and (text < 64).all()
  rows = np.asarray(ctx.train.sequences)
  assert any((text[i, :4] == rows[:, :4]).all(1).any() for i in range(8))  # prompts from training rows
  _, out = _run('seq_kd(rows=8, prompt_len=4, steps=2, learning_rate=0.01)', ctx, small_model, small)
  assert not np.array_equal(np.asarray(out['layers'][0]['mlp']['up_proj']['kernel']),
                            np.asarray(small['layers'][0]['mlp']['up_proj']['kernel']))


def test_tinybert_uniform_layer_map():
  teacher, student = _spec(2), _spec(1)
  assert recovery.uniform_layer_map(student, teacher) == ((0, 0), (1, 2))
  assert recovery.uniform_layer_map(teacher, teacher, embeddings=False) == ((1, 1), (2, 2))


@pytest.mark.parametrize('text, needle', [
    ('gptq(bits=4) > qat(bits=4)', 'stage 2 qat cannot run on blocks weights already quantized (by stage 1 gptq)'),
    ('svd(keep=0.5) > lsq(bits=4)', 'stage 2 lsq cannot run on blocks weights already lowrank'),
    ('share(group=2) > llm_qat(bits=4)', 'already shared'),
    ('lora(rank=2) > qat(bits=4)', 'already adapter'),
    ('qat(bits=4) > llm_qat(bits=4)', 'already quantized'),
    ('drop_layers(layers=(0,)) > drop_layers(layers=(0,))', 'already architecture'),
    ('qat(bits=9)', 'bits=9 is outside [2, 8]'),
    ('qat(act_bits=1)', 'act_bits=1 must lie in [2, 16]'),
    ('lsq(group_size=4)', "unknown argument(s) ['group_size']; valid: bits, steps, learning_rate"),
    ('llm_qat(steps=0)', 'steps=0 is outside [1, inf)'),
    ('gkd(fraction=1.5)', 'fraction=1.5 must lie in [0, 1]'),
    ('gkd(divergence="mse")', "divergence='mse'; choose 'jsd', 'soft_kl' or 'reverse_kl'"),
    ('gkd(beta=1.0)', 'beta=1.0 must lie strictly between 0 and 1'),
    ('gkd(prompt_len=0)', 'prompt_len=0 must be >= 1'),
    ('seq_kd(rows=0)', 'rows=0 must be >= 1'),
    ('drop_layers(layers=2)', 'layers=2 is not a'),
    ('qat(fmt="nf3")', "fmt='nf3'; choose 'int', 'nf4' or 'fp8'"),
    ('fresh_student(depth=1)', "missing 2 required keyword-only arguments: 'width' and 'heads'"),
    ('fresh_student(depth=1, width=30, heads=4)', 'width=30 is not divisible by heads=4'),
    ('gptq(bits=4) > fresh_student(depth=1, width=32, heads=4)', 'already quantized'),
    ('share(by="x")', "by='x'; choose 'consecutive', 'agglomerative' or 'greedy'"),
    ('distill(output="mse")', "output='mse'; choose from"),
    ('distill(output="jsd", beta=0.0)', 'beta=0.0 must lie strictly between 0 and 1'),
    ('recover(hidden_weight=-1.0)', 'hidden_weight=-1.0 must be >= 0'),
])
def test_bad_training_stages_fail_at_parse_time(text, needle):
  with pytest.raises(ValueError) as e:
    recipes.parse(text)
  assert needle in str(e.value)


def test_share_with_per_block_lora_deltas_starts_as_plain_sharing(setup2):
  model, params, ctx = setup2
  _, plain = _run('share(group=2)', ctx, model, params)
  _, relaxed = _run('share(group=2, lora_rank=2)', ctx, model, params)
  leaf = core.paths.get(relaxed, 'layers/1/mlp/up_proj/kernel')
  assert isinstance(leaf, core.LoRA) and isinstance(leaf.base, core.Shared) and leaf.lora_a.shape == (32, 2)
  tokens = ctx.calib[0]['tokens']
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(np.asarray(apply(relaxed, tokens)), np.asarray(apply(plain, tokens)), atol=1e-6)
  with pytest.raises(ValueError, match='already shared'):
    recipes.parse('share(lora_rank=2) > lora(rank=2)')
  with pytest.raises(ValueError, match='lora_rank=-1 must be >= 0'):
    recipes.parse('share(lora_rank=-1)')


def test_fresh_student_nf4_rtn_and_similarity_sharing_run(setup2):
  model, params, ctx = setup2
  student, sp = _run('fresh_student(depth=1, width=16, heads=2)', ctx, model, params)
  assert student.config.num_layers == 1 and student.config.hidden_size == 16 and student.config.num_kv_heads == 1
  assert sp['layers'][0]['mlp']['up_proj']['kernel'].shape == (16, 64)
  _, q = _run('rtn(fmt="nf4", group_size=32, clip="mse")', ctx, model, params)
  leaf = core.paths.get(q, 'layers/0/attn/q_proj/kernel')
  assert isinstance(leaf, core.Quantized) and leaf.fmt == 'nf4' and leaf.group_size == 32
  _, shared = _run('share(group=2, by="agglomerative")', ctx, model, params)
  assert isinstance(core.paths.get(shared, 'layers/1/mlp/up_proj/kernel'), core.Shared)
