"""Weight-only quantization of the causal-LM fixture with and without a QuaRot rotation: held-out perplexity.

    python experiments/tables/quarot_table.py --output_dir runs/quarot_table         # the fixture (4 layers, 256 wide)
    python experiments/tables/quarot_table.py --small --output_dir /tmp/quarot_small  # tiny random model, seconds

Rows: fp32; fp32 rotated (`quarot`: the same function, so the same perplexity up to float rounding); RTN W4 g128,
GPTQ W3 g128 and GPTQ W3 g128 act-order, each on the model as given and after `quarot` (randomized Hadamard
rotation of the residual stream and per-head values, norms folded; the fixture's tied head is split from the
table since its final norm's scale is not 1). Every block linear is quantized (asymmetric min-max grids); the
embedding, the head and the norms stay fp32. Calibration: `--calib_rows` training rows of the fixture's own data;
evaluation: the held-out rows.

all-MiniLM-L6-v2 is not in this table: BERT is post-norm and `quarot` refuses it (the residual stream is a
LayerNorm's scaled output, which no fused rotation commutes with).
"""

from __future__ import annotations

import math
import time

from experiments.tables import common

import jax
from absl import app, flags

from jaxcompress import quantization
from jaxcompress.eval import lm

common.define_flags('quarot_table')
flags.DEFINE_integer('calib_rows', 64, 'Training rows used for calibration.')
flags.DEFINE_integer('eval_rows', 256, 'Held-out rows scored (0: all).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  t0 = time.time()
  model, params, calib, held_out = common.llama_rows(small=FLAGS.small, name=FLAGS.model, calib_rows=FLAGS.calib_rows,
                                                    eval_rows=FLAGS.eval_rows, seed=FLAGS.seed)
  batches = [calib[i:i + 8, :-1] for i in range(0, calib.shape[0], 8)]
  gs = 16 if FLAGS.small else 128
  nll = lambda m, p: lm.rows_perplexity(m, p, held_out, batch_size=32).mean_nll
  t = time.time()
  rmodel, rparams = quantization.quarot(model, params, key=jax.random.key(FLAGS.seed))
  rotate_s = time.time() - t
  rows = [{'method': 'fp32', 'setting': '-', 'rotated': 'no', 'nll': nll(model, params), 'seconds': 0.0},
          {'method': 'fp32', 'setting': '-', 'rotated': 'yes', 'nll': nll(rmodel, rparams), 'seconds': rotate_s}]
  settings = (('RTN', f'W4 g{gs}', lambda m, p: quantization.rtn(
                  m, p, config=quantization.RTNConfig(bits=4, group_size=gs))),
              ('GPTQ', f'W3 g{gs}', lambda m, p: quantization.gptq(
                  m, p, batches, config=quantization.GPTQConfig(bits=3, group_size=gs))),
              ('GPTQ', f'W3 g{gs} act-order', lambda m, p: quantization.gptq(
                  m, p, batches, config=quantization.GPTQConfig(bits=3, group_size=gs, act_order=True))))
  for method, setting, run in settings:
    for rotated, (m, p) in (('no', (model, params)), ('yes', (rmodel, rparams))):
      t = time.time()
      qm, qp = run(m, p)
      rows.append({'method': method, 'setting': setting, 'rotated': rotated, 'nll': nll(qm, qp),
                   'seconds': time.time() - t + (rotate_s if rotated == 'yes' else 0.0)})
      print(rows[-1], flush=True)
  for r in rows:
    r['ppl'] = math.exp(r['nll'])
  table = ['| method | setting | rotated | held-out ppl | NLL | seconds |', '|---|---|---|---|---|---|']
  table += [f"| {r['method']} | {r['setting']} | {r['rotated']} | {r['ppl']:.3f} | {r['nll']:.4f} | "
            f"{r['seconds']:.1f} |" for r in rows]
  table += ['', f'{calib.shape[0]} calibration rows, {held_out.shape[0]} held-out rows of {held_out.shape[1] - 1} '
            f'predictions; rotation seed {FLAGS.seed}.']
  config = {k: FLAGS[k].value for k in ('model', 'seed', 'calib_rows', 'eval_rows', 'small')}
  common.write(FLAGS.output_dir, config, rows, '\n'.join(table), {'seconds': time.time() - t0})


if __name__ == '__main__':
  app.run(main)
