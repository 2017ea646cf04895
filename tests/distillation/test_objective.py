"""The distillation objective for fit: every term against a float64 recomputation, students from the teacher,
teacher storage, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import distillation, models
from jaxcompress.distillation import losses, students
from tests.train.test_step import BATCH, MODEL, _run, chex_close

TEACHER = models.Llama(models.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=4,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))


@pytest.fixture(scope='module')
def teacher_params():
  return jax.jit(TEACHER.init)(jax.random.key(3))


def test_select_layers_keeps_the_teachers_blocks(teacher_params):
  student, sp, layer_map = students.select_layers(TEACHER, teacher_params)
  assert layer_map == ((0, 0), (1, 1), (2, 3)) and student.config.num_layers == 2
  _, s_int = student.apply(sp, BATCH['inputs'], intermediates=('hidden_states',))
  # Running the teacher's block 2 on the student's first output gives the student's second output.
  ctx = TEACHER.context(BATCH['inputs'])
  h = TEACHER.block(TEACHER.block_params(teacher_params, 2), s_int['hidden_states'][1], ctx)
  np.testing.assert_allclose(s_int['hidden_states'][2], h, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r'blocks \[4\]'):
    students.select_layers(TEACHER, teacher_params, [0, 4])


def test_student_owns_its_buffers(teacher_params):
  # A train step donates the student's buffers; they must not be the teacher's, which stays in use.
  _, sp, _ = students.select_layers(TEACHER, teacher_params)
  teacher_buffers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(teacher_params)}
  shared = [x for x in jax.tree.leaves(sp) if x.unsafe_buffer_pointer() in teacher_buffers]
  assert not shared
  jax.tree.map(lambda x: x.delete(), sp)  # what donation does
  assert all(not x.is_deleted() for x in jax.tree.leaves(teacher_params))


def test_fresh_student_config():
  s = students.fresh(TEACHER, students.StudentConfig(depth=2, width=16, heads=2, ffn_ratio=3.0))
  c = s.config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (2, 16, 2, 1, 48)
  assert c.vocab_size == TEACHER.config.vocab_size
  with pytest.raises(ValueError, match='width=10 is not divisible by heads=3'):
    students.StudentConfig(depth=1, width=10, heads=3)


def _all_terms(output):
  return distillation.DistillConfig(output=output, temperature=2.0, alpha=0.6, layer_map=((1, 2), (2, 4)),
                                    hidden_weight=0.5, attention_weight=2.0, relation_weight=0.3,
                                    relation_heads=2)


@pytest.mark.parametrize('output', ['soft_kl', 'reverse_kl', 'jsd'])
def test_objective_sums_its_terms(teacher_params, output):
  cfg = _all_terms(output)
  student = students.fresh(TEACHER, students.StudentConfig(depth=2, width=16, heads=4, kv_heads=2, ffn_ratio=2))
  sp = student.init(jax.random.key(1))
  sp[distillation.PROJ] = distillation.init_projections(student, TEACHER, cfg, jax.random.key(2))
  assert set(sp[distillation.PROJ]) == {'0', '1'}
  obj = distillation.distillation(student, TEACHER, cfg)
  loss, (weight, metrics) = jax.jit(obj)(sp, teacher_params, BATCH, None)
  # Recompute every term from the models' outputs in float64 NumPy.
  plain, proj = distillation.split_params(sp)
  s_out, s_int = student.apply(plain, BATCH['inputs'], intermediates=('hidden_states', 'attention'))
  t_out, t_int = TEACHER.apply(teacher_params, BATCH['inputs'], intermediates=('hidden_states', 'attention'))
  f64 = lambda x: np.asarray(x, np.float64)
  ls = lambda x: f64(x) - np.log(np.exp(f64(x)).sum(-1, keepdims=True))
  t, s = ls(f64(t_out) / 2), ls(f64(s_out) / 2)
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)
  if output == 'soft_kl':
    kd = 4 * kl(t, s)
  elif output == 'reverse_kl':
    kd = 4 * kl(s, t)
  else:
    m = np.log(0.5 * np.exp(t) + 0.5 * np.exp(s))
    kd = 4 * (0.5 * kl(t, m) + 0.5 * kl(s, m))
  hidden = sum(((f64(s_int['hidden_states'][a]) @ f64(proj[str(k)]['kernel']) - f64(t_int['hidden_states'][b])) ** 2
                ).mean(-1) for k, (a, b) in enumerate(cfg.layer_map)) / 2
  att = sum(((f64(s_int['attention'][a - 1]) - f64(t_int['attention'][b - 1])) ** 2).mean(axis=(1, 3))
            for a, b in cfg.layer_map) / 2
  qs = distillation.last_layer_qkv(student, plain, s_int['hidden_states'][1], BATCH['inputs'])
  qt = distillation.last_layer_qkv(TEACHER, teacher_params, t_int['hidden_states'][3], BATCH['inputs'])
  rel = sum(f64(losses.relation_kl(a, b, 2)) for a, b in zip(qs, qt)) / 3
  logp = ls(s_out)
  nll = -np.take_along_axis(logp, np.asarray(BATCH['targets'])[..., None], -1)[..., 0]
  ref = 0.4 * nll + 0.6 * (kd + 0.5 * hidden + 2.0 * att + 0.3 * rel)
  np.testing.assert_allclose(loss, ref.sum(), rtol=2e-4)
  for name, val in (('kd', kd), ('hidden', hidden), ('attention', att), ('relation', rel), ('nll', nll)):
    np.testing.assert_allclose(metrics[name], val.sum(), rtol=2e-4, err_msg=name)
  assert weight == BATCH['targets'].size


def test_last_layer_qkv_matches_the_attention(teacher_params):
  """Queries and keys recomputed from the last block's input reproduce its attention probabilities."""
  _, t_int = TEACHER.apply(teacher_params, BATCH['inputs'], intermediates=('hidden_states', 'attention'))
  q, k, _ = distillation.last_layer_qkv(TEACHER, teacher_params, t_int['hidden_states'][3], BATCH['inputs'])
  from jaxcompress.models import layers
  c = TEACHER.config
  inv, _ = layers.rope_frequencies(c.dim_per_head, c.rope_theta)
  pos = TEACHER.context(BATCH['inputs']).positions
  b, t, _ = q.shape
  qr = np.asarray(layers.apply_rope(q.reshape(b, t, 4, 8), pos, inv), np.float64)
  kr = np.asarray(layers.apply_rope(k.reshape(b, t, 2, 8), pos, inv), np.float64)
  kr = np.repeat(kr, 2, axis=2)
  scores = np.einsum('bqnh,bknh->bnqk', qr, kr) / np.sqrt(8) + np.triu(np.full((t, t), -np.inf), 1)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(t_int['attention'][3], probs, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('storage', ['bfloat16', 'int8'])
def test_frozen_teacher_storage(teacher_params, storage):
  frozen = distillation.prepare_teacher(TEACHER, teacher_params, storage)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  assert nbytes(frozen) < 0.6 * nbytes(teacher_params)
  if storage == 'int8':  # training against a stored teacher (one storage suffices: the step code is shared)
    # a one-block student (teacher block 0): the stored teacher's part of the step is the same, the step compiles
    # faster
    student, sp, layer_map = students.select_layers(TEACHER, teacher_params, [0])
    cfg = distillation.DistillConfig(output='soft_kl', layer_map=layer_map, hidden_weight=1.0)
    obj = distillation.distillation(student, TEACHER, cfg)
    state, h = _run(sp, steps=3, objective=obj, frozen=frozen)
    assert h[-1]['loss'] < h[0]['loss']
    chex_close(state.frozen, frozen, 0.0)  # the teacher is never updated
  # The stored teacher stays close to the float32 one.
  logits = TEACHER.apply(teacher_params, BATCH['inputs'])
  stored = TEACHER.apply(frozen, BATCH['inputs']).astype(jnp.float32)
  assert float(jnp.max(jnp.abs(stored - logits))) < 0.05 * float(jnp.max(jnp.abs(logits)))


def test_bad_input_is_named(teacher_params):
  other_vocab = models.Llama(models.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                                num_layers=2, num_heads=4, num_kv_heads=2))
  with pytest.raises(ValueError, match='vocab_size=50 and teacher vocab_size=48'):
    distillation.distillation(other_vocab, TEACHER, distillation.DistillConfig())
  with pytest.raises(ValueError, match='names teacher layer 7'):
    distillation.distillation(MODEL, TEACHER, distillation.DistillConfig(layer_map=((1, 7),), hidden_weight=1))
  with pytest.raises(ValueError, match='names student layer 3'):
    distillation.distillation(MODEL, TEACHER, distillation.DistillConfig(layer_map=((3, 1),), hidden_weight=1))
  for t in (0, -2.0):
    with pytest.raises(ValueError, match=f'temperature={t}'):
      distillation.DistillConfig(temperature=t)
  with pytest.raises(ValueError, match='output="hidden" compares encoder outputs'):
    distillation.distillation(MODEL, TEACHER, distillation.DistillConfig(output='hidden'))
  with pytest.raises(ValueError, match="output='kl'"):
    distillation.DistillConfig(output='kl')
  with pytest.raises(ValueError, match="storage='int4'"):
    distillation.prepare_teacher(TEACHER, teacher_params, 'int4')


def test_encoder_student_with_padding():
  """An encoder pair: output hidden-state MSE and relations over real keys only, masked by attention_mask."""
  bert = models.Bert(models.BertConfig(vocab_size=30, hidden_size=16, num_layers=4, num_heads=2,
                                       intermediate_size=32, max_position_embeddings=16))
  tp = bert.init(jax.random.key(0))
  student, sp, layer_map = students.select_layers(bert, tp)
  x = np.random.RandomState(1).randint(0, 30, (3, 7)).astype(np.int32)
  m = np.ones((3, 7), np.int32)
  m[1, 4:] = 0
  batch = {'inputs': jnp.asarray(x), 'attention_mask': jnp.asarray(m)}
  cfg = distillation.DistillConfig(output='hidden', alpha=1.0, relation_weight=1.0, relation_heads=2)
  loss, (weight, metrics) = distillation.distillation(student, bert, cfg)(sp, tp, batch, None)
  s_out, s_int = student.apply(sp, batch['inputs'], attention_mask=batch['attention_mask'],
                               intermediates=('hidden_states',))
  t_out, t_int = bert.apply(tp, batch['inputs'], attention_mask=batch['attention_mask'],
                            intermediates=('hidden_states',))
  mse = ((np.asarray(s_out, np.float64) - np.asarray(t_out, np.float64)) ** 2).mean(-1)
  rel = sum(losses.relation_kl(a, b, 2, batch['attention_mask']) for a, b in zip(
      distillation.last_layer_qkv(student, sp, s_int['hidden_states'][-2], batch['inputs'], batch['attention_mask']),
      distillation.last_layer_qkv(bert, tp, t_int['hidden_states'][-2], batch['inputs'], batch['attention_mask']))) / 3
  np.testing.assert_allclose(metrics['kd'], (mse * m).sum(), rtol=1e-4)
  np.testing.assert_allclose(loss, ((mse + np.asarray(rel)) * m).sum(), rtol=1e-4)
  assert weight == m.sum() and float(metrics['relation']) > 0
  with pytest.raises(ValueError, match='alpha=0.5'):
    distillation.distillation(student, bert, distillation.DistillConfig(output='hidden', alpha=0.5))
