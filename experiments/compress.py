"""Compress a model with a recipe of stages across families, evaluate it against the original, save and report.

    python experiments/compress.py                       # all-MiniLM-L6-v2, the default recipe, fortunes sentences
    python experiments/compress.py --list_methods        # every method, its config fields and paper
    python experiments/compress.py --model=fixture --recipe='sparsegpt(sparsity=0.5) > gptq(bits=4) > distill(steps=100)'
    python experiments/compress.py --recipe=recipe.json --output_dir=runs/mine
    python experiments/compress.py --import=my_methods --recipe='ternary() > gptq(bits=4)'   # methods of a module

Each run writes into --output_dir: config.json, environment.json (package versions, git revision), metrics.jsonl
(one record per stage), compressed.jxc (core.serialize) and orbax/ (the same tree with orbax), hf/ (the dense
equivalent as a Hugging Face checkpoint), compressed_tensors/ and gptq/ (packed quantized checkpoints, where the
leaves allow or --export names them), report.md (the survey's criteria: size, compression rate, quality and
its drop, speed-up, peak memory, time to compress, fine-tuning cost, hardware fit, energy) and stages.png.
The work is `jaxcompress.recipes.pipeline.compress`; this script is its command line. It prints the stage lines
and the report; the INFO logs of absl, orbax, jax and XLA show with --verbosity=1 or higher.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

from absl import app, flags
from absl import logging as absl_logging

from experiments import cli

DEFAULT_RECIPE = ('rtn(bits=4, group_size=32, include=(), embeddings=True, clip="mse") '
                  '> gptq(bits=5, group_size=128, act_order=True)')
MODELS = ('minilm', 'fixture', 'tiny')  # jaxcompress.recipes.setup.MODELS (not imported here: jax loads later)

flags.DEFINE_string('model', 'minilm', "'minilm' (all-MiniLM-L6-v2), 'fixture' (the causal-LM fixture), 'tiny' (a "
                    'random 2-layer Llama, seconds) or a checkpoint directory holding config.json.')
flags.DEFINE_string('recipe', DEFAULT_RECIPE, "Stages joined by '>' (name(arg=value, ...)), or a JSON file of "
                    '[{"method": name, args...}]. See --list_methods.')
flags.DEFINE_bool('list_methods', False, 'Print every registered method with its config fields and paper, then exit.')
flags.DEFINE_list('import', [], 'Python modules imported before the recipe is read (comma-separated): the methods '
                  'they register show in --list_methods and run in --recipe.')
flags.DEFINE_string('calib_data', 'default', "Calibration text: 'default' (fortunes sentences for encoders, the "
                    "fixture's training rows for causal LMs), a .txt file (one text per line) or a .npy of token rows.")
flags.DEFINE_string('eval_data', 'default', "Evaluation text: 'default' (held-out fortunes sentences / the fixture's "
                    'held-out rows), a .txt file or a .npy of token rows [N, T + 1].')
flags.DEFINE_integer('calib_samples', 512, 'Calibration sequences.', lower_bound=1)
flags.DEFINE_integer('eval_samples', 256, 'Evaluation sequences.', lower_bound=1)
flags.DEFINE_integer('seq_len', 64, 'Tokens per encoder sentence (longer ones are cut).', lower_bound=8)
flags.DEFINE_integer('batch_size', 32, 'Sequences per calibration, evaluation and training batch.', lower_bound=1)
flags.DEFINE_integer('seed', 0, 'The one seed every random choice derives from.')
flags.DEFINE_string('output_dir', 'runs/compress', 'Where the run writes its files: a new or empty directory, or '
                    'one holding a run of the same settings (replaced once this run finishes).')
flags.DEFINE_bool('overwrite', False, 'Replace an --output_dir holding a run of other settings, as a whole.')
flags.DEFINE_bool('save', True, 'Write compressed.jxc, orbax/ and hf/ (False: report and metrics only).')
flags.DEFINE_bool('per_stage_eval', True, 'Evaluate after every stage (the points of stages.png).')
flags.DEFINE_bool('measure', True, 'Measure speed, fine-tuning cost and energy (False: size and quality only).')
flags.DEFINE_integer('timing_reps', 5, 'Interleaved repetitions of the dense/compressed speed measurements.',
                     lower_bound=1)
flags.DEFINE_integer('data', -1, 'Mesh: data-parallel devices splitting calibration rows (-1 fills).')
flags.DEFINE_integer('fsdp', 1, 'Mesh: devices parameters are sharded over (calibration keeps 1).', lower_bound=1)
flags.DEFINE_integer('tensor', 1, 'Mesh: tensor-parallel devices (calibration keeps 1).', lower_bound=1)
flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.', lower_bound=1)
flags.DEFINE_integer('process_id', None, 'Multi-host: this process.', lower_bound=0)
flags.DEFINE_string('cpu_collectives', None, "Multi-host on CPU: 'gloo'.")
flags.DEFINE_bool('out_of_core', False, 'Run the layer-wise stages block by block from the checkpoint on disk '
                  '(calibration.compress_checkpoint: one block in memory, resumable) into --output_dir/blocks/, '
                  'then reload it for the report. Every stage must be a calibrated one-shot method that compresses '
                  'block by block (a refusal lists them, from their registrations); the stages run one after '
                  'another on each block, each on the hidden states it sees in memory (owl / distribution=owl: '
                  'after a first streamed pass over the dense model).')
flags.DEFINE_list('export', None, 'Formats --save writes, comma-separated: jxc (compressed.jxc, orbax/), '
                  'compressed-tensors (compressed_tensors/), gptq (gptq/), dense (hf/). Default: jxc, dense and each '
                  'packed format that holds every compressed leaf (jaxcompress.recipes.exports).')
FLAGS = flags.FLAGS
SETTINGS = ('calib_data', 'eval_data', 'calib_samples', 'eval_samples', 'seq_len', 'batch_size', 'seed',
            'per_stage_eval', 'timing_reps', 'measure', 'out_of_core')  # passed to compress() as they are
MESH = ('data', 'fsdp', 'tensor')  # recorded in config.json


def quiet_logs(verbosity: int) -> None:
  """Below --verbosity=1, only warnings of absl, orbax, jax and XLA's C++ logs show; at 1 their INFO lines too;
  from 2 absl's DEBUG levels (call before importing jax)."""
  if verbosity == 1:
    absl_logging.set_verbosity(absl_logging.INFO)
  if verbosity >= 1:
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  absl_logging.set_verbosity(absl_logging.WARNING)
  for name in ('absl', 'orbax', 'jax'):
    logging.getLogger(name).setLevel(logging.WARNING)


def load_methods() -> None:
  """Imports the --import modules (their `registry.register` lines run)."""
  from jaxcompress import registry
  try:
    registry.load_plugins(getattr(FLAGS, 'import'))
  except ImportError as e:
    raise app.UsageError(f'--import={",".join(getattr(FLAGS, "import"))}: {e}') from None


def _mesh():
  from jaxcompress.train import sharding
  if FLAGS.coordinator or FLAGS.num_processes:
    sharding.initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, FLAGS.cpu_collectives)
  import jax
  if jax.device_count() == 1 and FLAGS.data in (-1, 1):
    return None
  return sharding.make_mesh(FLAGS.data, FLAGS.fsdp, FLAGS.tensor)


def validate() -> None:
  """Every flag checked before loading anything; a ValueError names the flag, its value and the fix."""
  from jaxcompress import recipes
  try:
    recipes.parse(FLAGS.recipe)
  except ValueError as e:
    raise ValueError(f'--recipe: {str(e).removeprefix("recipe: ")}') from None
  if FLAGS.model not in MODELS and not (pathlib.Path(FLAGS.model) / 'config.json').is_file():
    raise ValueError(f'--model={FLAGS.model!r}: choose {", ".join(MODELS)} or a directory holding config.json.')
  for name in ('calib_data', 'eval_data'):
    v = getattr(FLAGS, name)
    if v != 'default' and not (re.search(r'\.(txt|npy)$', v) and pathlib.Path(v).is_file()):
      raise ValueError(f"--{name}={v!r}: give 'default' or an existing .txt (encoders) / .npy (causal LMs) file.")
  from jaxcompress.recipes import exports
  try:
    exports.parse(FLAGS.export)
  except ValueError as e:
    raise ValueError(f'--{e}') from None
  if FLAGS.fsdp != 1 or FLAGS.tensor != 1:
    raise ValueError(f'--fsdp={FLAGS.fsdp} --tensor={FLAGS.tensor}: calibration splits batch rows only; keep both 1.')
  if FLAGS.cpu_collectives not in (None, 'gloo'):
    raise ValueError(f"--cpu_collectives={FLAGS.cpu_collectives!r}: only 'gloo' (or unset).")
  if (FLAGS.num_processes or 1) > 1 and (FLAGS.coordinator is None or FLAGS.process_id is None):
    raise ValueError('--num_processes > 1 needs --coordinator=host:port and --process_id.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; every setting is a --flag (see --help).')
  quiet_logs(FLAGS.verbosity)
  load_methods()
  if FLAGS.list_methods:
    from jaxcompress import recipes
    print(recipes.describe())
    return
  try:
    validate()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  mesh = _mesh()
  import jax

  from jaxcompress.recipes import pipeline, preflight
  out = FLAGS.output_dir
  if jax.process_count() > 1:
    out = str(pathlib.Path(out) / f'process{jax.process_index()}')
  t0 = time.perf_counter()
  try:  # the model, its data files and the recipe against its shapes are checked before any work
    pipeline.compress(FLAGS.model, FLAGS.recipe, output_dir=out, save=FLAGS.save, mesh=mesh, verbose=True,
                      settings={k: FLAGS[k].value for k in MESH}, overwrite=FLAGS.overwrite, export=FLAGS.export,
                      **{k: FLAGS[k].value for k in SETTINGS})
  except preflight.PreflightError as e:
    raise app.UsageError(cli.as_flag(str(e))) from None
  print(f'total {time.perf_counter() - t0:.1f}s')


def console():
  """The `jaxcompress-compress` command (an error it can name before any work: one line, exit status 2)."""
  cli.run(main)


if __name__ == '__main__':
  console()
