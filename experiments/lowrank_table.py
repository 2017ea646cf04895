"""Perplexity of the causal-LM fixture after low-rank factorization of its block kernels, per method.

SVD vs FWSVD vs ASVD vs SVD-LLM at 20%, 30% and 50% parameter reduction of the selected kernels (every kernel
keeps the same fraction, so all methods get the same ranks), before and after the same recovery budget
(the LowRank factors trained with loop.fit, everything else frozen).

    python experiments/lowrank_table.py --output_dir=runs/lowrank_table          # the fixture
    python experiments/lowrank_table.py --small --output_dir=/tmp/lr             # smoke run in seconds
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

flags.DEFINE_string('model', 'fixture', "'fixture' or a causal-LM checkpoint directory with training.json.")
flags.DEFINE_string('output_dir', 'runs/lowrank_table', 'Where results.json, table.md and recovery runs go.')
flags.DEFINE_integer('seed', 0, 'The one seed every random choice derives from.')
flags.DEFINE_boolean('small', False, 'A random tiny model on random tokens (smoke test).')
flags.DEFINE_list('reductions', ['0.2', '0.3', '0.5'], 'Fractions of the selected kernels\' parameters removed.')
flags.DEFINE_list('methods', ['svd', 'fwsvd', 'asvd', 'svd_llm'], 'Factorization methods.')
flags.DEFINE_integer('calib_batches', 8, 'Training batches for calibration statistics and Fisher rows.')
flags.DEFINE_integer('steps', 100, 'Recovery steps (LowRank factors only); 0 skips recovery.')
flags.DEFINE_float('learning_rate', 1e-3, 'Recovery peak learning rate.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from experiments import compress_runs
  from jaxcompress import calibration, lowrank

  steps = min(FLAGS.steps, 2) if FLAGS.small else FLAGS.steps
  model, params, train, valid = compress_runs.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  out = pathlib.Path(FLAGS.output_dir)
  calib = compress_runs.calibration_batches(train, 2 if FLAGS.small else FLAGS.calib_batches)
  t0 = time.time()
  stats = calibration.calibrate(model, params, [{'tokens': b['tokens']} for b in calib],
                                calibration.combine(h=calibration.hessian(), m=calibration.abs_mean()))
  fisher = lowrank.fisher_rows(model, params, [{'inputs': b['inputs'], 'targets': b['targets']} for b in calib])
  print(f'calibration statistics and Fisher rows: {time.time() - t0:.1f}s')
  dense_ppl = compress_runs.perplexity(model, params, valid)
  rows = [{'method': 'dense', 'reduction': 0.0, 'ppl': dense_ppl, 'ppl_recovered': dense_ppl}]
  print(f'dense perplexity {dense_ppl:.2f}')
  sel = model.select(params)
  for red in [float(r) for r in FLAGS.reductions]:
    for method in FLAGS.methods:
      cfg = lowrank.SVDConfig(method=method, ranks=lowrank.RankRule(keep=1 - red))
      st = {'svd': None, 'fwsvd': fisher}.get(method, stats)
      t0 = time.time()
      compressed = lowrank.compress(params, config=cfg, stats=st)
      seconds = time.time() - t0
      ranks = lowrank.ranks_of(compressed)
      kept = sum(ranks[p] * sum(s) for p, s in zip(sel.paths, sel.shapes)) / sum(a * b for a, b in sel.shapes)
      ppl = compress_runs.perplexity(model, compressed, valid)
      recovered = compress_runs.recover(model, compressed, train, steps=steps, seed=FLAGS.seed,
                                        run_dir=out / 'runs' / f'{method}_{red}', trainable=lowrank.LOWRANK_TRAINABLE,
                                        learning_rate=FLAGS.learning_rate)
      ppl_rec = compress_runs.perplexity(model, recovered, valid)
      row = {'method': method, 'reduction': red, 'kept': round(kept, 3), 'ppl': ppl, 'ppl_recovered': ppl_rec,
             'factorize_s': round(seconds, 1)}
      rows.append(row)
      print(row, flush=True)
  table = compress_runs.markdown(
      rows, ['method', 'reduction', 'kept', 'ppl', 'ppl_recovered', 'factorize_s'])
  table += (f'\n\nppl: held-out perplexity ({valid.shape[0]} rows); ppl_recovered: after {steps} steps of '
            'training the LowRank factors only (same budget for every method); kept: fraction of the selected '
            'kernels\' parameters stored.')
  compress_runs.write(str(out), {'flags': FLAGS.flag_values_dict()}, rows, table)


if __name__ == '__main__':
  app.run(main)
