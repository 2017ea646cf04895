"""Distils a causal-LM teacher into a smaller student, evaluates it and saves it as a Hugging Face checkpoint.

    python experiments/distill.py --output_dir=runs/distill                    # fixture -> blocks 0, 2; soft KL
    python experiments/distill.py --student_layers=0,3 --loss=reverse_kl --steps=300
    python experiments/distill.py --student_layers=fresh --student_depth=2 --student_width=128 --loss=gkd
    python experiments/distill.py --small --output_dir=/tmp/d                  # tiny random teacher, seconds
    launch/local_multihost.sh 2 1 experiments/distill.py --small --output_dir=/tmp/d2

Teacher: 'fixture' or a checkpoint directory trained like it (its training.json gives the data); --small uses a
tiny random teacher on random tokens. Student: the teacher's own blocks (--student_layers="0,2"; empty = every
other block, DistilBERT's initialization) sharing its embeddings and head, or 'fresh': a random model of the
teacher's family with the --student_* sizes. Loss (`distillation.DistillConfig`):
  soft_kl     Hinton et al. 2015: KL(teacher || student) of the temperature-softened next-token distributions
  reverse_kl  MiniLLM (Gu et al. 2024): KL(student || teacher), mode-seeking
  gkd         GKD (Agarwal et al. 2024): generalized Jensen-Shannon with --beta (on the data, not on-policy)
  lm          no teacher term: next-token loss only (the control at equal budget)
mixed as (1 - alpha) next-token loss + alpha (output term + --hidden_weight hidden-state MSE over the layer map,
through learned projections when widths differ; TinyBERT-style). The teacher is held frozen in the training
state (--teacher_storage float32 | bfloat16 | int8) and trained through `train.loop.fit`.
Writes into --output_dir: results.json (held-out perplexity of teacher, student before and after, sizes, train
seconds), report.md, config.json, environment.json, hf/ (the student; with the teacher's tokenizer files) and
runs/ (the fit run: metrics, TensorBoard events). `experiments/evaluate.py --model=<output_dir>/hf
--reference=<teacher>` measures it further.
"""

from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pathlib
import shutil

from absl import app, flags

LOSSES = {'soft_kl': 'soft_kl', 'reverse_kl': 'reverse_kl', 'gkd': 'jsd', 'lm': 'none'}  # flag -> DistillConfig

flags.DEFINE_string('teacher', 'fixture', "Teacher: 'fixture' or a checkpoint directory trained like it "
                    '(holding training.json).')
flags.DEFINE_boolean('small', False, 'A tiny random teacher on random tokens instead of --teacher (smoke runs).')
flags.DEFINE_string('student_layers', '', 'Teacher blocks the student keeps, e.g. "0,2" (empty: every other '
                    "block), or 'fresh' for a random student of the --student_* sizes.")
flags.DEFINE_integer('student_depth', 2, "Fresh student: blocks (with --student_layers=fresh).")
flags.DEFINE_integer('student_width', 128, 'Fresh student: hidden size.')
flags.DEFINE_integer('student_heads', 4, 'Fresh student: query heads.')
flags.DEFINE_float('student_ffn_ratio', 3.0, 'Fresh student: MLP width over hidden size.')
flags.DEFINE_enum('loss', 'soft_kl', list(LOSSES), 'Distillation term (see the module docstring).')
flags.DEFINE_float('temperature', 1.0, 'Temperature of the logit terms.')
flags.DEFINE_float('alpha', 0.9, 'Weight of the distillation terms against the next-token loss, in [0, 1].')
flags.DEFINE_float('beta', 0.5, "GKD's beta, in (0, 1).")
flags.DEFINE_float('hidden_weight', 0.0, 'Weight of hidden-state MSE over the layer map (0: off).')
flags.DEFINE_enum('teacher_storage', 'float32', ['float32', 'bfloat16', 'int8'], 'How the frozen teacher is held.')
flags.DEFINE_integer('steps', 300, 'Optimizer steps.')
flags.DEFINE_integer('batch_size', 16, 'Sequences per step (a multiple of the devices).')
flags.DEFINE_float('learning_rate', 1e-3, 'Peak learning rate (cosine decay, 10% warm-up).')
flags.DEFINE_integer('eval_rows', 0, 'Held-out rows scored (0: all).')
flags.DEFINE_integer('seed', 0, 'Seed of every random choice (student init, projections, batch order).')
flags.DEFINE_string('output_dir', 'runs/distill', 'Where results, the student checkpoint and the run go.')
flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', None, 'Multi-host: this process.')
flags.DEFINE_string('cpu_collectives', None, "Multi-host on CPU: 'gloo'.")
FLAGS = flags.FLAGS


def parse_layers(value: str) -> tuple[int, ...] | str | None:
  """'' -> None (every other block), 'fresh' -> 'fresh', '0,2' -> (0, 2); ValueError naming the flag."""
  value = value.strip()
  if value in ('', 'fresh'):
    return value or None
  try:
    return tuple(int(v) for v in value.split(','))
  except ValueError:
    raise ValueError(f'--student_layers={value!r}: give block indices like "0,2", empty for every other block, '
                     "or 'fresh'.") from None


def check_flags() -> None:
  """Every flag checked before any work; ValueError naming the flag, the value and the fix."""
  from jaxcompress.recipes import fixture
  if not FLAGS.small:
    try:
      path = fixture.resolve(FLAGS.teacher)
    except FileNotFoundError as e:
      raise ValueError(f'--teacher: {e}') from None
    if not (path / 'training.json').is_file():
      raise ValueError(f"--teacher={FLAGS.teacher!r}: '{path}' has no training.json, so its training data is "
                       "unknown; give 'fixture' or a directory written by experiments/pretrain.py (run_dir/hf "
                       'with training.json copied next to it), or --small.')
  layers = parse_layers(FLAGS.student_layers)
  if isinstance(layers, tuple) and (list(layers) != sorted(set(layers)) or min(layers) < 0):
    raise ValueError(f'--student_layers={FLAGS.student_layers!r}: blocks must be >= 0, increasing, no repeats.')
  for name in ('student_depth', 'student_width', 'student_heads', 'steps', 'batch_size'):
    if FLAGS[name].value < 1:
      raise ValueError(f'--{name}={FLAGS[name].value} must be >= 1.')
  if FLAGS.student_width % FLAGS.student_heads:
    raise ValueError(f'--student_width={FLAGS.student_width} must be a multiple of --student_heads='
                     f'{FLAGS.student_heads}.')
  checks = {'temperature': FLAGS.temperature > 0, 'alpha': 0 <= FLAGS.alpha <= 1, 'beta': 0 < FLAGS.beta < 1,
            'hidden_weight': FLAGS.hidden_weight >= 0, 'learning_rate': FLAGS.learning_rate > 0,
            'student_ffn_ratio': FLAGS.student_ffn_ratio > 0, 'eval_rows': FLAGS.eval_rows >= 0}
  ranges = {'temperature': '> 0', 'alpha': 'in [0, 1]', 'beta': 'in (0, 1)', 'hidden_weight': '>= 0',
            'learning_rate': '> 0', 'student_ffn_ratio': '> 0', 'eval_rows': '>= 0'}
  for name, ok in checks.items():
    if not ok:
      raise ValueError(f'--{name}={FLAGS[name].value} must be {ranges[name]}.')
  if FLAGS.loss == 'lm' and FLAGS.hidden_weight:
    raise ValueError('--loss=lm trains without the teacher; --hidden_weight must be 0 with it.')
  explicit = (FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
  if any(v is not None for v in explicit) and None in explicit:
    raise ValueError('--coordinator, --num_processes and --process_id go together (or none of them, where the '
                     f'platform provides them); got {explicit}.')


def student_of(teacher, tparams, layers, seed: int):
  """(student spec, initial params, layer map) from the flags' student spec."""
  from jaxcompress.distillation import students
  from jaxcompress.train import loop
  if layers != 'fresh':
    return students.select_layers(teacher, tparams, layers)
  sc = students.StudentConfig(depth=FLAGS.student_depth, width=FLAGS.student_width, heads=FLAGS.student_heads,
                              ffn_ratio=FLAGS.student_ffn_ratio)
  student = students.fresh(teacher, sc)
  n_t = teacher.num_layers(tparams)
  # Each student block's output matched to the teacher block at the same relative depth (embeddings to embeddings).
  layer_map = ((0, 0),) + tuple((k + 1, round((k + 1) * n_t / sc.depth)) for k in range(sc.depth))
  return student, student.init(loop.rng_stream(seed, 'init')), layer_map


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; every setting is a --flag (see --help).')
  try:
    check_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  from jaxcompress.train import sharding
  if FLAGS.coordinator is not None or sharding.platform_provides_processes():
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                                    FLAGS.cpu_collectives)
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  from jaxcompress import distillation, models, provenance
  from jaxcompress.recipes import fixture, lm_runs
  from jaxcompress.train import loop, objectives

  out = pathlib.Path(FLAGS.output_dir)
  if FLAGS.small:
    teacher, tparams, data, valid = lm_runs.small_setup(FLAGS.seed)
    data = type(data)(sequences=data.sequences, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  else:
    teacher, tparams, data, valid = lm_runs.fixture_setup(FLAGS.teacher, FLAGS.batch_size)
  valid = valid[:FLAGS.eval_rows or None]
  layers = parse_layers(FLAGS.student_layers)
  n_t = teacher.num_layers(tparams)
  if isinstance(layers, tuple) and max(layers) >= n_t:
    raise app.UsageError(f'--student_layers={FLAGS.student_layers!r}: the teacher has blocks 0..{n_t - 1}.')
  student, sparams, layer_map = student_of(teacher, tparams, layers, FLAGS.seed)

  cfg = distillation.DistillConfig(output=LOSSES[FLAGS.loss], temperature=FLAGS.temperature,
                                   alpha=0.0 if FLAGS.loss == 'lm' else FLAGS.alpha, beta=FLAGS.beta,
                                   layer_map=layer_map if FLAGS.hidden_weight else (),
                                   hidden_weight=FLAGS.hidden_weight)
  if FLAGS.loss == 'lm':
    objective, frozen = objectives.causal_lm(student), None
  else:
    objective = distillation.distillation(student, teacher, cfg)
    frozen = distillation.prepare_teacher(teacher, tparams, FLAGS.teacher_storage)
    projections = distillation.init_projections(student, teacher, cfg, loop.rng_stream(FLAGS.seed, 'projections'))
    if projections:
      sparams = {**sparams, distillation.PROJ: projections}

  before = lm_runs.heldout_nll(student, distillation.split_params(sparams)[0], valid)
  trained, seconds = lm_runs.train('student', student, sparams, objective, data, steps=FLAGS.steps,
                                   lr=FLAGS.learning_rate, seed=FLAGS.seed, out=out, frozen=frozen)
  trained = distillation.split_params(trained)[0]
  if jax.process_count() > 1:
    trained = multihost_utils.process_allgather(trained, tiled=True)
  trained = jax.device_get(trained)
  after = lm_runs.heldout_nll(student, trained, valid)
  teacher_nll = lm_runs.heldout_nll(teacher, tparams, valid)
  size = student.summary(trained, seq_len=valid.shape[1] - 1).total.as_dict()
  tsize = teacher.summary(tparams, seq_len=valid.shape[1] - 1).total.as_dict()
  results = {'teacher_perplexity': float(np.exp(teacher_nll)), 'student_perplexity_before': float(np.exp(before)),
             'student_perplexity': float(np.exp(after)), 'train_s': seconds, 'steps': FLAGS.steps,
             'tokens': FLAGS.steps * data.tokens_per_batch, 'heldout_rows': int(len(valid)),
             'student_params': size['params'], 'teacher_params': tsize['params'],
             'student_layers': [t - 1 for _, t in layer_map[1:]] if layers != 'fresh' else 'fresh',
             'processes': jax.process_count()}
  if jax.process_index() != 0:
    return
  hf = models.save_pretrained(out / 'hf', student, trained)
  if not FLAGS.small:  # the student reads the teacher's token ids: ship its tokenizer too
    src = fixture.resolve(FLAGS.teacher)
    for f in src.iterdir():
      if f.name.startswith(('tokenizer', 'special_tokens', 'vocab', 'merges')):
        shutil.copy2(f, hf / f.name)
  config = {'flags': FLAGS.flag_values_dict(), 'distill': cfg, 'student': student.config, 'layer_map': layer_map}
  provenance.write_run_dir(out, config=config, results=results)
  report = (f"# {FLAGS.loss} distillation, {FLAGS.steps} steps\n\n| model | params | held-out perplexity |\n"
            f"|---|---:|---:|\n| teacher | {tsize['params']:,} | {results['teacher_perplexity']:.2f} |\n"
            f"| student before | {size['params']:,} | {results['student_perplexity_before']:.2f} |\n"
            f"| student after | {size['params']:,} | {results['student_perplexity']:.2f} |\n\n"
            f"student: {results['student_layers']}; {results['tokens']:,} training tokens in {seconds:.0f} s; "
            f"{len(valid)} held-out rows\n")
  provenance.atomic_write(out / 'report.md', report)
  print(report)
  print(f'student checkpoint: {hf}\nresults: {out / "results.json"}')


def console():
  """The `jaxcompress-distill` command."""
  app.run(main)


if __name__ == '__main__':
  console()
