"""Distils the causal-LM fixture (4 layers) into a half-depth student and compares objectives at equal budget.

    python experiments/distill_table.py                         # the committed fixture, 300 steps per row
    python experiments/distill_table.py --model=/path/to/hf --steps=500
    python experiments/distill_table.py --small                 # a tiny random teacher, seconds (smoke test)

Rows (every trained row: same student shape, same steps, same batches, same optimizer):
  teacher                  the fixture itself
  layers, untrained        the student made of the teacher's blocks `--layers` (embeddings and head shared)
  scratch (LM)             the same student shape from a random init, plain next-token loss
  layers + LM              the teacher's blocks, plain next-token loss (what the initialization alone gives)
  layers + soft KL         Hinton et al. 2015, temperature --temperature, alpha --alpha
  layers + reverse KL      MiniLLM's mode-seeking divergence (on the data, not on-policy samples)
  layers + GKD (JSD beta)  generalized Jensen-Shannon (on the data, not on-policy samples)
  layers + seq-level KD    plain LM loss on text the teacher sampled with KV-cache decoding (--seq_kd)
Perplexity is on held-out rows the fixture never saw. Writes results.json, table.md, config and environment.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import distillation, models, provenance
from jaxcompress.data import pipeline
from jaxcompress.distillation import students
from jaxcompress.eval import token_nll
from jaxcompress.train import loop, objectives, optim

flags.DEFINE_string('model', 'fixture', "Teacher: 'fixture' or a Hugging Face checkpoint directory.")
flags.DEFINE_string('output_dir', 'runs/distill_table', 'Where results.json and table.md go.')
flags.DEFINE_integer('seed', 0, 'Seed of every random choice (student init, batch order).')
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
flags.DEFINE_integer('eval_rows', 64, 'Held-out rows scored.')
flags.DEFINE_boolean('seq_kd', True, 'Also train on teacher-generated text (sequence-level KD).')
flags.DEFINE_integer('seq_kd_rows', 256, 'Distinct teacher-generated sequences (the rows cycle over them).')
flags.DEFINE_boolean('small', False, 'Tiny random teacher and data, a few steps: a smoke test.')
FLAGS = flags.FLAGS


def _small_setup(seed: int):
  cfg = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64, tie_embeddings=True)
  teacher = models.Llama(cfg)
  params = teacher.init(jax.random.key(seed))
  rows = np.asarray(jax.random.randint(jax.random.key(seed + 1), (48, 17), 0, 64), np.int32)
  return teacher, params, pipeline.LMBatches(sequences=rows[:32], batch_size=8, seed=seed), rows[32:]


def _fixture_setup(name: str, batch_size: int):
  from experiments import fixture
  teacher, params = fixture.load(name)
  _, train, valid = fixture.data(fixture.resolve(name), batch_size=batch_size)
  return teacher, params, train, valid


def heldout_nll(model, params, rows: np.ndarray, batch: int = 16) -> float:
  """Mean next-token NLL (nats) over the held-out rows [N, T + 1]."""
  fn = jax.jit(lambda p, x, y: token_nll(model.apply(p, x).astype(jnp.float32), y).sum())
  total = sum(float(fn(params, rows[i:i + batch, :-1], rows[i:i + batch, 1:])) for i in range(0, len(rows), batch))
  return total / (rows.shape[0] * (rows.shape[1] - 1))


def train(name, model, params, objective, data, *, steps, lr, seed, out: pathlib.Path, frozen=None):
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, warmup_steps=max(steps // 10, 1),
                                                   total_steps=steps, weight_decay=0.01))
  cfg = loop.LoopConfig(steps=steps, batch_size=data.batch_size, run_dir=str(out / 'runs' / name), seed=seed,
                        checkpoint_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False,
                        resume=False, log_every=max(steps // 5, 1))
  t0 = time.perf_counter()
  result = loop.fit(cfg, model=model, params=params, objective=objective, optimizer=opt, data=data,
                    frozen=frozen)
  return result.state.params, time.perf_counter() - t0


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
    teacher, tparams, data, valid = _small_setup(FLAGS.seed)
  else:
    teacher, tparams, data, valid = _fixture_setup(FLAGS.model, FLAGS.batch_size)
  valid = valid[:FLAGS.eval_rows]
  layers = [int(i) for i in FLAGS.layers] or None
  student, sparams, layer_map = students.select_layers(teacher, tparams, layers)
  rows = []

  def add(name, model, params, seconds=None, **extra):
    nll = heldout_nll(model, params, valid)
    rows.append({'row': name, 'nll': nll, 'perplexity': float(np.exp(nll)), 'train_s': seconds, **extra})
    print(f'{name:28s} ppl {np.exp(nll):9.2f}', flush=True)

  add('teacher', teacher, tparams)
  add('layers, untrained', student, sparams)
  lm = objectives.causal_lm(student)
  scratch = student.init(loop.rng_stream(FLAGS.seed, 'init'))
  p, s = train('scratch', student, scratch, lm, data, steps=steps, lr=FLAGS.scratch_learning_rate,
               seed=FLAGS.seed, out=out)
  add(f'scratch (LM, lr {FLAGS.scratch_learning_rate:g})', student, p, s)
  if FLAGS.scratch_same_lr:
    p, s = train('scratch_same_lr', student, scratch, lm, data, steps=steps, lr=FLAGS.learning_rate,
                 seed=FLAGS.seed, out=out)
    add(f'scratch (LM, lr {FLAGS.learning_rate:g})', student, p, s)
  p, s = train('layers_lm', student, sparams, lm, data, steps=steps, lr=FLAGS.learning_rate, seed=FLAGS.seed,
               out=out)
  add('layers + LM', student, p, s)
  for output, label in (('soft_kl', 'soft KL'), ('reverse_kl', 'reverse KL'), ('jsd', f'GKD (JSD b={FLAGS.beta:g})')):
    cfg = distillation.DistillConfig(output=output, temperature=FLAGS.temperature, alpha=FLAGS.alpha,
                                     beta=FLAGS.beta)
    p, s = train(output, student, sparams, distillation.distillation(student, teacher, cfg), data, steps=steps,
                 lr=FLAGS.learning_rate, seed=FLAGS.seed, out=out, frozen=tparams)
    add(f'layers + {label}', student, p, s)
  if FLAGS.seq_kd:
    t0 = time.perf_counter()
    text = teacher_text(teacher, tparams, data, 16 if FLAGS.small else FLAGS.seq_kd_rows, FLAGS.seed)
    gen_s = time.perf_counter() - t0
    gen = pipeline.LMBatches(sequences=text, batch_size=data.batch_size, seed=FLAGS.seed)
    p, s = train('seq_kd', student, sparams, lm, gen, steps=steps, lr=FLAGS.learning_rate, seed=FLAGS.seed,
                 out=out)
    add('layers + seq-level KD', student, p, s, generate_s=gen_s, generated_rows=int(text.shape[0]))

  header = '| row | held-out perplexity | train s |\n|---|---|---|\n'
  secs = lambda r: '' if r['train_s'] is None else f"{r['train_s']:.0f}"
  table = header + ''.join(f"| {r['row']} | {r['perplexity']:.2f} | {secs(r)} |\n" for r in rows)
  config = {'flags': {k: FLAGS[k].value for k in ('model', 'seed', 'steps', 'batch_size', 'learning_rate',
                                                   'scratch_learning_rate', 'scratch_same_lr', 'layers', 'temperature', 'alpha',
                                                   'beta', 'eval_rows', 'seq_kd', 'seq_kd_rows', 'small')},
            'student_layers': [t - 1 for _, t in layer_map[1:]], 'steps': steps,
            'tokens_per_row': steps * data.tokens_per_batch}
  provenance.write_run_dir(out, config=config, results={'rows': rows})
  (out / 'table.md').write_text(table)
  print(f'\nstudent: teacher blocks {config["student_layers"]}, {steps} steps x {data.tokens_per_batch} tokens '
        f'per trained row; held-out rows: {len(valid)}\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
