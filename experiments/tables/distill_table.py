"""Distils the causal-LM fixture (4 layers) into a half-depth student and compares objectives at equal budget.

    python experiments/tables/distill_table.py                  # the committed fixture, 300 steps per row
    python experiments/tables/distill_table.py --model=/path/to/hf --steps=500
    python experiments/tables/distill_table.py --small          # a tiny random teacher, seconds (smoke test:
                                                                # no 'layers + LM', of the data-KD rows soft KL)

Rows (every trained row: same student shape, same steps, same batches, same optimizer):
  teacher                  the fixture itself
  layers, untrained        the student made of the teacher's blocks `--layers` (embeddings and head shared)
  scratch (LM)             the same student shape from a random init, plain next-token loss
  layers + LM              the teacher's blocks, plain next-token loss (what the initialization alone gives)
  layers + soft KL         Hinton et al. 2015, temperature --temperature, alpha --alpha
  layers + reverse KL      MiniLLM's mode-seeking divergence (on the data, not on-policy samples)
  layers + JSD (beta)      generalized Jensen-Shannon on the data (GKD with lambda = 0: supervised KD)
  layers + GKD on-policy   generalized JSD where, with probability --gkd_fraction, a batch keeps its first
                           --prompt_len tokens and the rest is sampled from the current student inside the step
                           (Agarwal et al. 2024); divergence only (alpha 1: sampled tokens have no reference)
  layers + seq-level KD    plain LM loss on text the teacher sampled with KV-cache decoding (--seq_kd)
Perplexity is on held-out rows the fixture never saw. Writes results.json, table.md, config and environment.
"""

from __future__ import annotations

import pathlib
import time

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import distillation, models, provenance
from jaxcompress.data import pipeline
from jaxcompress.distillation import students
from jaxcompress.recipes import lm_runs
from jaxcompress.train import loop, objectives

common.define_flags('distill_table')
flags.DEFINE_integer('steps', 300, 'Optimizer steps per trained row.')
flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
flags.DEFINE_float('learning_rate', 1e-3, 'Peak learning rate (cosine decay, 10% warm-up).')
flags.DEFINE_float('scratch_learning_rate', 3e-3, 'Peak rate of the from-scratch row (the fixture was '
                   'pretrained at 3e-3; a random init wants the larger rate).')
flags.DEFINE_boolean('scratch_same_lr', False, 'Also train the from-scratch row at --learning_rate.')
flags.DEFINE_list('layers', [], 'Teacher blocks the student keeps (default: every other, from block 0).')
flags.DEFINE_float('temperature', 1.0, 'Temperature of the logit terms.')
flags.DEFINE_float('alpha', 0.9, 'Weight of the distillation term against the next-token loss.')
flags.DEFINE_float('beta', 0.5, "GKD's beta.")
flags.DEFINE_float('gkd_fraction', 0.5, 'GKD lambda: share of batches whose continuations the student samples.')
flags.DEFINE_integer('prompt_len', 16, 'Data tokens kept as the prompt of an on-policy batch.')
flags.DEFINE_integer('eval_rows', 64, 'Held-out rows scored.')
flags.DEFINE_boolean('seq_kd', True, 'Also train on teacher-generated text (sequence-level KD).')
flags.DEFINE_integer('seq_kd_rows', 256, 'Distinct teacher-generated sequences (the rows cycle over them).')
FLAGS = flags.FLAGS


def teacher_text(teacher, params, data, rows: int, seed: int) -> np.ndarray:
  """rows sequences [rows, T + 1] the teacher sampled (temperature 1) from 8-token prompts of training rows."""
  t = data.seq_len + 1
  prompts = data.sequences[np.asarray(jax.random.permutation(jax.random.key(seed), data.num_sequences))[:rows], :8]
  out = []
  for i in range(0, rows, 64):
    out.append(np.asarray(models.generate(teacher, params, jnp.asarray(prompts[i:i + 64], jnp.int32),
                                          max_new_tokens=t - 8, temperature=1.0,
                                          key=jax.random.fold_in(jax.random.key(seed), i))))
  return np.concatenate(out).astype(np.int32)


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  steps = 2 if FLAGS.small else FLAGS.steps
  if FLAGS.small:
    teacher, tparams, data, valid = lm_runs.small_setup(FLAGS.seed)
  else:
    teacher, tparams, data, valid = lm_runs.fixture_setup(FLAGS.model, FLAGS.batch_size)
  valid = valid[:FLAGS.eval_rows]
  layers = [int(i) for i in FLAGS.layers] or None
  student, sparams, layer_map = students.select_layers(teacher, tparams, layers)
  rows = []

  def add(name, model, params, seconds=None, **extra):
    nll = lm_runs.heldout_nll(model, params, valid)
    rows.append({'row': name, 'nll': nll, 'perplexity': float(np.exp(nll)), 'train_s': seconds, **extra})
    print(f'{name:28s} ppl {np.exp(nll):9.2f}', flush=True)

  add('teacher', teacher, tparams)
  add('layers, untrained', student, sparams)
  lm = objectives.causal_lm(student)
  scratch = student.init(loop.rng_stream(FLAGS.seed, 'init'))
  p, s = lm_runs.train('scratch', student, scratch, lm, data, steps=steps, lr=FLAGS.scratch_learning_rate,
               seed=FLAGS.seed, out=out)
  add(f'scratch (LM, lr {FLAGS.scratch_learning_rate:g})', student, p, s)
  if FLAGS.scratch_same_lr:
    p, s = lm_runs.train('scratch_same_lr', student, scratch, lm, data, steps=steps, lr=FLAGS.learning_rate,
                 seed=FLAGS.seed, out=out)
    add(f'scratch (LM, lr {FLAGS.learning_rate:g})', student, p, s)
  # --small skips the rows that differ from another row only in the initial params or the divergence (each
  # divergence is tested in tests/distillation): the scratch row runs this one's code, soft KL the others'
  if not FLAGS.small:
    p, s = lm_runs.train('layers_lm', student, sparams, lm, data, steps=steps, lr=FLAGS.learning_rate,
                         seed=FLAGS.seed, out=out)
    add('layers + LM', student, p, s)
  data_kd = (('soft_kl', 'soft KL'), ('reverse_kl', 'reverse KL'), ('jsd', f'JSD b={FLAGS.beta:g} (data)'))
  for output, label in data_kd[:1] if FLAGS.small else data_kd:
    cfg = distillation.DistillConfig(output=output, temperature=FLAGS.temperature, alpha=FLAGS.alpha,
                                     beta=FLAGS.beta)
    p, s = lm_runs.train(output, student, sparams, distillation.distillation(student, teacher, cfg), data, steps=steps,
                 lr=FLAGS.learning_rate, seed=FLAGS.seed, out=out, frozen=tparams)
    add(f'layers + {label}', student, p, s)
  gkd = distillation.DistillConfig(output='jsd', temperature=FLAGS.temperature, alpha=1.0, beta=FLAGS.beta)
  policy = distillation.OnPolicyConfig(fraction=FLAGS.gkd_fraction, prompt_len=4 if FLAGS.small else FLAGS.prompt_len)
  p, s = lm_runs.train('gkd_on_policy', student, sparams,
                      distillation.on_policy_distillation(student, teacher, gkd, policy), data, steps=steps,
                      lr=FLAGS.learning_rate, seed=FLAGS.seed, out=out, frozen=tparams)
  add(f'layers + GKD on-policy (JSD b={FLAGS.beta:g}, lambda={FLAGS.gkd_fraction:g})', student, p, s)
  if FLAGS.seq_kd:
    t0 = time.perf_counter()
    text = teacher_text(teacher, tparams, data, 16 if FLAGS.small else FLAGS.seq_kd_rows, FLAGS.seed)
    gen_s = time.perf_counter() - t0
    gen = pipeline.LMBatches(sequences=text, batch_size=data.batch_size, seed=FLAGS.seed)
    p, s = lm_runs.train('seq_kd', student, sparams, lm, gen, steps=steps, lr=FLAGS.learning_rate, seed=FLAGS.seed,
                 out=out)
    add('layers + seq-level KD', student, p, s, generate_s=gen_s, generated_rows=int(text.shape[0]))

  header = '| row | held-out perplexity | train s |\n|---|---|---|\n'
  secs = lambda r: '' if r['train_s'] is None else f"{r['train_s']:.0f}"
  table = header + ''.join(f"| {r['row']} | {r['perplexity']:.2f} | {secs(r)} |\n" for r in rows)
  config = {'flags': {k: FLAGS[k].value for k in (
      'model', 'seed', 'steps', 'batch_size', 'learning_rate', 'scratch_learning_rate', 'scratch_same_lr', 'layers',
      'temperature', 'alpha', 'beta', 'gkd_fraction', 'prompt_len', 'eval_rows', 'seq_kd', 'seq_kd_rows', 'small')},
            'student_layers': [t - 1 for _, t in layer_map[1:]], 'steps': steps,
            'tokens_per_row': steps * data.tokens_per_batch}
  provenance.write_run_dir(out, config=config, results={'rows': rows})
  (out / 'table.md').write_text(table)
  print(f'\nstudent: teacher blocks {config["student_layers"]}, {steps} steps x {data.tokens_per_batch} tokens '
        f'per trained row; held-out rows: {len(valid)}\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
