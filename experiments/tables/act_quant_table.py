"""Weight and activation quantization of the causal-LM fixture (W4A16, W4A8, W4A4) with no rotation, QuaRot's
fused rotations, and those plus the online Hadamard on down_proj's input: held-out perplexity.

    python experiments/tables/act_quant_table.py --output_dir runs/act_quant_table   # the fixture (4 layers, 256 wide)
    python experiments/tables/act_quant_table.py --small --output_dir /tmp/aq_small   # tiny random model, seconds

Weights: RTN W4 g128 and GPTQ W4 g128 (asymmetric min-max grids) on every block linear, the recipes
`[quarot[(online=True)] >] rtn|gptq(bits=4) [> act_quant(bits=8|4)]`; activations rounded per token (symmetric
absmax, dynamic) at the input of every block linear. The embedding, the head and the norms stay fp32.
Calibration: `--calib_rows` training rows of the fixture's own data; evaluation: the held-out rows.

all-MiniLM-L6-v2 is not in this table: BERT is post-norm and `quarot` refuses it.
"""

from __future__ import annotations

import math
import time

from experiments.tables import common

from absl import app, flags

from jaxcompress import recipes

common.define_flags('act_quant_table')
flags.DEFINE_integer('calib_rows', 64, 'Training rows used for calibration (GPTQ).')
flags.DEFINE_integer('eval_rows', 256, 'Held-out rows scored (0: all).')
flags.DEFINE_list('weights', ['rtn', 'gptq'], 'Weight quantizers (rtn, gptq), each at 4 bits.')
FLAGS = flags.FLAGS

ROTATIONS = (('none', ''), ('fused', 'quarot > '), ('fused + online', 'quarot(online=True) > '))
ACTIVATIONS = (('16', ''), ('8', ' > act_quant(bits=8)'), ('4', ' > act_quant(bits=4)'))


def main(argv):
  del argv
  t0 = time.time()
  model, params, calib, held_out, ctx, gs, nll = common.llama_recipe_rows(FLAGS)
  rows = [{'weights': 'fp32', 'activations': '16', 'rotation': 'none', 'recipe': '-', 'nll': nll(model, params),
           'seconds': 0.0}]
  quantizers = {'rtn': ('RTN W4', f'rtn(bits=4, group_size={gs})'),
                'gptq': ('GPTQ W4', f'gptq(bits=4, group_size={gs})')}
  unknown = sorted(set(FLAGS.weights) - set(quantizers))
  if unknown:
    raise app.UsageError(f'--weights={",".join(FLAGS.weights)}: unknown {unknown}; choose from {sorted(quantizers)}.')
  for weights, quantizer in (quantizers[w] for w in FLAGS.weights):
    for rotation, prefix in ROTATIONS:
      for bits, suffix in ACTIVATIONS:
        recipe = prefix + quantizer + suffix
        t = time.time()
        m, p = recipes.run(recipes.parse(recipe), ctx, model, params)
        rows.append({'weights': weights, 'activations': bits, 'rotation': rotation, 'recipe': recipe,
                     'nll': nll(m, p), 'seconds': time.time() - t})
        print(rows[-1], flush=True)
  for r in rows:
    r['ppl'] = math.exp(r['nll'])
  table = ['| weights | rotation | A16 | A8 | A4 |', '|---|---|---:|---:|---:|',
           f"| fp32 | none | {rows[0]['ppl']:.2f} | | |"]
  for weights in (quantizers[w][0] for w in FLAGS.weights):
    for rotation, _ in ROTATIONS:
      cells = {r['activations']: r['ppl'] for r in rows if r['weights'] == weights and r['rotation'] == rotation}
      table.append(f"| {weights} | {rotation} | {cells['16']:.2f} | {cells['8']:.2f} | {cells['4']:.2f} |")
  table += ['', f'{calib.shape[0]} calibration rows, {held_out.shape[0]} held-out rows of {held_out.shape[1] - 1} '
            f'predictions; group size {gs}; rotation seed {FLAGS.seed}.']
  config = {k: FLAGS[k].value for k in ('model', 'seed', 'calib_rows', 'eval_rows', 'small', 'weights')}
  common.write(FLAGS.output_dir, config, rows, '\n'.join(table), {'seconds': time.time() - t0})


if __name__ == '__main__':
  app.run(main)
