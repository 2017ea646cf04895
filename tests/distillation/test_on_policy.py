"""On-policy GKD: sampled batches come from the student (deterministic given the key), the loss against a
float64 NumPy JSD on those tokens, fraction 0 is supervised KD, the objective trains under fit's step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import distillation, models
from jaxcompress.distillation import on_policy, students
from tests.distillation.test_objective import TEACHER
from tests.train.test_step import BATCH, _run

CFG = distillation.DistillConfig(output='jsd', beta=0.3, temperature=1.5, alpha=1.0)
POLICY = distillation.OnPolicyConfig(fraction=1.0, prompt_len=4, temperature=1.0)


@pytest.fixture(scope='module')
def pair():
  tp = jax.jit(TEACHER.init)(jax.random.key(3))
  tp['lm_head']['kernel'] = tp['lm_head']['kernel'] * 30  # peaked distributions: a divergence well above rounding
  student, sp, _ = students.select_layers(TEACHER, tp)
  return tp, student, sp


def _jsd64(t_logits, s_logits, beta, temp):
  f = lambda x: np.asarray(x, np.float64) / temp
  ls = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
  t, s = ls(f(t_logits)), ls(f(s_logits))
  m = np.log(beta * np.exp(t) + (1 - beta) * np.exp(s))
  kl = lambda a, b: (np.exp(a) * (a - b)).sum(-1)
  return temp ** 2 * (beta * kl(t, m) + (1 - beta) * kl(s, m))


def test_sampled_batches_come_from_the_student_and_the_loss_matches_numpy(pair):
  tp, student, sp = pair
  obj = jax.jit(distillation.on_policy_distillation(student, TEACHER, CFG, POLICY))
  rng = jax.random.key(7)
  loss, (weight, metrics) = obj(sp, tp, BATCH, rng)
  # The continuation is exactly what KV-cache sampling of the student gives with the objective's sampling key.
  _, key = on_policy.split_key(rng)
  seq = np.asarray(models.generate(student, sp, BATCH['inputs'][:, :4], max_new_tokens=9, temperature=1.0, key=key))
  np.testing.assert_array_equal(seq[:, :4], np.asarray(BATCH['inputs'][:, :4]))
  assert not np.array_equal(seq[:, 1:], np.asarray(BATCH['targets']))  # not the data
  again = obj(sp, tp, BATCH, rng)
  np.testing.assert_array_equal(np.asarray(loss), np.asarray(again[0]))  # same key, same samples, same loss
  other = obj(sp, tp, BATCH, jax.random.key(8))
  assert float(other[0]) != float(loss)
  # float64 reference: JSD(beta) of teacher and student logits on the sampled sequence, generated positions only.
  x = jnp.asarray(seq[:, :-1])
  jsd = _jsd64(TEACHER.apply(tp, x), student.apply(sp, x), 0.3, 1.5)
  counted = np.arange(12) >= 3
  np.testing.assert_allclose(float(loss), jsd[:, counted].sum(), rtol=2e-5)
  assert float(weight) == 8 * counted.sum() and float(metrics['on_policy']) == float(weight)


def test_fraction_zero_is_supervised_kd_and_a_mixed_run_trains(pair):
  tp, student, sp = pair
  off = distillation.OnPolicyConfig(fraction=0.0, prompt_len=4)
  a = distillation.on_policy_distillation(student, TEACHER, CFG, off)(sp, tp, BATCH, jax.random.key(0))
  b = distillation.distillation(student, TEACHER, CFG)(sp, tp, BATCH, None)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
  assert float(a[1][1]['on_policy']) == 0
  mixed = distillation.on_policy_distillation(student, TEACHER, CFG, distillation.OnPolicyConfig(
      fraction=0.5, prompt_len=4))
  _, hist = _run(sp, steps=4, objective=mixed, frozen=tp)  # the coin and samples follow the run's key
  drawn = [float(h['on_policy']) for h in hist]
  assert set(drawn) == {0.0, 1.0} and all(np.isfinite(h['loss']) for h in hist)


def test_bad_settings_are_named(pair):
  tp, student, sp = pair
  with pytest.raises(ValueError, match='alpha=0.5'):
    distillation.on_policy_distillation(student, TEACHER, distillation.DistillConfig(output='jsd', alpha=0.5),
                                        POLICY)
  with pytest.raises(ValueError, match='fraction=1.5'):
    distillation.OnPolicyConfig(fraction=1.5)
  with pytest.raises(ValueError, match='temperature=0'):
    distillation.OnPolicyConfig(temperature=0)
  obj = distillation.on_policy_distillation(student, TEACHER, CFG, distillation.OnPolicyConfig(prompt_len=12))
  with pytest.raises(ValueError, match='prompt_len=12'):
    obj(sp, tp, BATCH, jax.random.key(0))
