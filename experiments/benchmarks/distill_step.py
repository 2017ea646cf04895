"""Distillation step time over the plain student step time, beside the teacher's share of the FLOPs.

    python experiments/benchmarks/distill_step.py                       # fixture-sized random teacher, CPU
    python experiments/benchmarks/distill_step.py --model=/path/to/hf   # a checkpoint as the teacher

The student is the teacher's every other block (`distillation.students.select_layers`). Timed: the engine's
step (`step.make_train_step`, jitted) with `objectives.causal_lm(student)` and with
`distillation.distillation(student, teacher, soft KL)` and the teacher in `TrainState.frozen`, called
interleaved (the host may be shared), medians reported. Ideal overhead: the distillation step also runs the
teacher's forward pass (no backward), so

    ratio_goal = 1 + F_teacher_fwd / (3 F_student_fwd)

with forward FLOPs per token from `model.summary` (kernels and attention); the measured ratio is printed
beside it.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax
import numpy as np
import optax
from absl import app, flags

from jaxcompress import distillation, models, provenance
from jaxcompress.distillation import students
from jaxcompress.train import objectives
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib

flags.DEFINE_string('model', '', "Teacher checkpoint ('fixture' or a directory); empty: a random teacher of "
                    "the fixture's shape (Llama, 4 layers, 256 wide, vocab 4096).")
flags.DEFINE_integer('batch', 16, 'Sequences per step.')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('repeats', 10, 'Timed calls of each step.')
flags.DEFINE_list('teacher_storage', ['float32', 'bfloat16'], 'How the teacher is held (each timed, interleaved): '
                  'float32, bfloat16, int8.')
flags.DEFINE_string('output_dir', '', 'If set, results.json, config and environment go there.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.model:
    from jaxcompress.recipes import fixture
    teacher, tparams = fixture.load(FLAGS.model)
  else:
    teacher = models.Llama(models.LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768,
                                              num_layers=4, num_heads=4, num_kv_heads=2, tie_embeddings=True,
                                              max_position_embeddings=2048))
    tparams = teacher.init(jax.random.key(0))
  student, sparams, _ = students.select_layers(teacher, tparams)
  rows = np.random.RandomState(0).randint(0, teacher.config.vocab_size, (FLAGS.batch, FLAGS.seq_len + 1))
  batch = {'inputs': rows[:, :-1].astype(np.int32), 'targets': rows[:, 1:].astype(np.int32)}
  tx = optax.adamw(1e-4)
  kd = distillation.distillation(student, teacher, distillation.DistillConfig(output='soft_kl'))
  cands = [('plain', objectives.causal_lm(student), None)]
  for storage in FLAGS.teacher_storage:
    frozen = distillation.prepare_teacher(teacher, tparams, storage)
    cands.append((f'distill ({storage} teacher)', kd, jax.tree.map(lambda x: x.copy(), frozen)))
  steps, states = {}, {}
  for name, obj, fr in cands:
    steps[name] = jax.jit(step_lib.make_train_step(obj, tx))
    states[name] = state_lib.init_state(jax.tree.map(lambda x: x.copy(), sparams), tx, jax.random.key(1), frozen=fr)
    states[name], _ = jax.block_until_ready(steps[name](states[name], batch))  # compile
  times = {name: [] for name in steps}
  for _ in range(FLAGS.repeats):
    for name in steps:
      t0 = time.perf_counter()
      states[name], m = jax.block_until_ready(steps[name](states[name], batch))
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  ft = teacher.summary(tparams, seq_len=FLAGS.seq_len, by='total').total.flops
  fs = student.summary(sparams, seq_len=FLAGS.seq_len, by='total').total.flops
  share = ft / (ft + 3 * fs)
  goal = 1 + ft / (3 * fs)
  ratios = {k: v / med['plain'] for k, v in med.items() if k != 'plain'}
  results = {'median_step_s': med, 'ratios': ratios, 'goal': goal, 'teacher_fwd_flops_per_token': ft,
             'student_fwd_flops_per_token': fs, 'teacher_flops_share': share, 'times_s': times,
             'device': str(jax.devices()[0])}
  print(f'teacher {teacher.num_layers(tparams)} layers, student {student.num_layers(sparams)} layers; batch '
        f'{FLAGS.batch} x {FLAGS.seq_len}; {FLAGS.repeats} interleaved calls each on {jax.devices()[0].platform} '
        '(a shared host: only the ratios of one run compare)')
  print(f"plain student step             {med['plain'] * 1e3:8.1f} ms (median)")
  for k, r in ratios.items():
    print(f'{k:30s} {med[k] * 1e3:8.1f} ms   ratio {r:5.2f}   goal <= 1 + teacher fwd / student fwd+bwd '
          f'FLOPs = {goal:.2f} (teacher forward share of the FLOPs {share:.2f})')
  if FLAGS.output_dir:
    provenance.write_run_dir(FLAGS.output_dir, config={'flags': {k: FLAGS[k].value for k in (
        'model', 'batch', 'seq_len', 'repeats', 'teacher_storage')}}, results=results)


if __name__ == '__main__':
  app.run(main)
