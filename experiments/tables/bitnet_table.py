"""BitNet b1.58 ternary weights on the causal-LM fixture: every block kernel as γ · {−1, 0, +1} (γ = mean |W|),
untrained and trained quantization-aware (distilled from the float model), by held-out perplexity of the final
2-bit `Quantized` leaves; the embedding, norms and head stay float.

    python experiments/tables/bitnet_table.py                     # 200 steps per trained row, 256 held-out rows
    python experiments/tables/bitnet_table.py --small             # a tiny random model, seconds (smoke test)

Rows: the float model; the absmean ternarization without training (per kernel, and per output column);
`bitnet(steps=..., learning_rate=...)` per kernel (the paper's) and per output column.
"""

from __future__ import annotations

import time

from experiments.tables import common

from absl import app, flags

common.define_flags('bitnet_table')
flags.DEFINE_integer('steps', 200, 'Training steps of each trained row.')
flags.DEFINE_float('lr', 1e-3, 'Peak learning rate.')
flags.DEFINE_integer('eval_rows', 256, 'Held-out rows scored (0: all).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from jaxcompress import core, recipes
  from jaxcompress.quantization._src import bitnet

  model, params, train, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  valid = valid[:FLAGS.eval_rows] if FLAGS.eval_rows else valid
  steps = 4 if FLAGS.small else FLAGS.steps
  rows = [{'method': 'float', 'steps': 0, 'ppl': common.perplexity(model, params, valid)}]
  rules = model.selection_rules()
  for per_column in (False, True):
    untrained = core.select_by(params, rules).map(lambda _, w: bitnet.to_quantized(w, per_column), params)
    rows.append({'method': f'ternary, no training ({"per column" if per_column else "per kernel"})', 'steps': 0,
                 'ppl': common.perplexity(model, untrained, valid)})
    print(rows[-1], flush=True)
  for per_column in (False, True):
    ctx = recipes.Context(reference_model=model, reference=params, calib=(), train=train, seed=FLAGS.seed,
                          run_dir=f'{FLAGS.output_dir}/runs')
    t0 = time.perf_counter()
    _, out = recipes.run(recipes.parse(f'bitnet(steps={steps}, learning_rate={FLAGS.lr}, per_column={per_column})'),
                         ctx, model, params)
    rows.append({'method': f'bitnet ({"per column" if per_column else "per kernel"})', 'steps': steps,
                 'ppl': common.perplexity(model, out, valid), 'seconds': time.perf_counter() - t0,
                 'disk_MiB': core.stats.totals(out).disk / 2 ** 20})
    print(rows[-1], flush=True)
  common.write(FLAGS.output_dir, {'flags': FLAGS.flag_values_dict()}, rows,
               common.markdown(rows, ['method', 'steps', 'ppl', 'seconds', 'disk_MiB']))


if __name__ == '__main__':
  app.run(main)
