"""The quantization frontier on the causal-LM fixture: every weight quantizer at W4, W3 and W2 weight-only and at
W4A8 and W4A4, without and with QuaRot's rotations (fused and online), as held-out perplexity.

    python experiments/tables/frontier_table.py --output_dir runs/frontier_table    # the fixture (4 layers, 256 wide)
    python experiments/tables/frontier_table.py --small --output_dir /tmp/ft_small   # tiny random model, seconds
    python experiments/tables/frontier_table.py --methods=omniquant --settings=W3 --rotations=none   # one cell

Each cell is the recipe `[quarot(online=True) > [spinquant(bits=B[, act_bits=A]) >]] <method>(bits=B,
group_size=128) [> act_quant(bits=A)]`: rotation 'none', 'online' (QuaRot's fused and online Hadamards) or
'learned' (those, then SpinQuant's rotations learned for that cell's bits: the residual stream's and, unless
`--nor2`, each block's value rotation); the weights of every block
linear on asymmetric min-max grids of 128 rows (RTN; GPTQ; QuIP's incoherence processing around GPTQ; AWQ;
OmniQuant's learned clipping), activations rounded per token (symmetric absmax, dynamic; `--noact_symmetric`:
each token's own range and zero point; `--act_group_size`: one scale per that many channels of a token) at every
block linear's input for W4A8 / W4A4. `gptq_mse` is `gptq(mse=True)`, the authors' clipping search.
`omniquant_let` is `omniquant(let=True, act_bits=A)`: the norm -> linear scales learned too, with the activations
rounded while each block is fitted. The embedding, the head and the norms stay fp32. Calibration: `--calib_rows`
training rows of the fixture's own data, in batches of 8; evaluation: the held-out rows. Writes table.md, results.json and
frontier.png (each cell's perplexity over fp32's, as bars grouped by setting).
"""

from __future__ import annotations

import math
import pathlib
import time

from experiments.tables import common

from absl import app, flags

from jaxcompress import recipes

common.define_flags('frontier_table')
flags.DEFINE_integer('calib_rows', 128, 'Training rows used for calibration.')
flags.DEFINE_integer('eval_rows', 256, 'Held-out rows scored (0: all).')
flags.DEFINE_list('methods', ['rtn', 'gptq', 'quip', 'awq', 'omniquant', 'omniquant_let'],
                  "Weight quantizers: registry names, 'omniquant_let' (LET too, activations rounded while fitting) "
                  "or 'gptq_mse' (GPTQ with the authors' clipping search, gptq(mse=True)).")
flags.DEFINE_integer('group_size', 128, 'Rows per weight scale (0: one per output column); 16 with --small.')
flags.DEFINE_list('settings', ['W4', 'W3', 'W2', 'W4A8', 'W4A4'], 'Columns: weight bits and activation bits.')
flags.DEFINE_bool('act_symmetric', True, 'W4A8 / W4A4: symmetric per-token activation grids; False: each '
                  "token's range sets a scale and a zero point (act_quant(symmetric=False)).")
flags.DEFINE_integer('act_group_size', 0, 'W4A8 / W4A4: one activation scale per this many input channels of a '
                     'token (0: one per token).')
flags.DEFINE_bool('let_pairs', False, "omniquant_let: also the linear -> linear scales (v_proj -> o_proj, "
                  'up_proj -> down_proj).')
flags.DEFINE_float('let_alpha', None, "omniquant_let: LET's scales start at SmoothQuant's max|x|^α / max|W|^(1−α) "
                   '(None: at 1).')
flags.DEFINE_bool('r2', True, "'learned': SpinQuant also learns each block's value rotation (R2); False: R1 only.")
flags.DEFINE_list('rotations', ['none', 'online'],
                  "'none', 'online' (quarot(online=True) first) and/or 'learned' (then spinquant for the cell's bits).")
FLAGS = flags.FLAGS

SETTINGS = {'W4': (4, None), 'W3': (3, None), 'W2': (2, None), 'W4A8': (4, 8), 'W4A4': (4, 4)}
ROTATIONS = ('none', 'online', 'learned')


def rotation(name: str, bits: int, act: int | None, gs: int) -> str:
  """The recipe's rotation stages: none, QuaRot's (fused and online), or those and SpinQuant's learned rotation
  for the cell's weight and activation bits."""
  if name == 'none':
    return ''
  if name == 'online':
    return 'quarot(online=True) > '
  return (f'quarot(online=True) > spinquant(bits={bits}, group_size={gs}' + (f', act_bits={act}' if act else '')
          + ('' if FLAGS.r2 else ', r2=False') + ') > ')


def stage(method: str, bits: int, act: int | None, gs: int) -> str:
  """The recipe of one cell after the rotation: the weight stage, then the activation rounding."""
  if method == 'omniquant_let':  # OmniQuant's weight-activation setting: LET learned with the inputs rounded
    pairs = (', let_pairs=True' if FLAGS.let_pairs else '') + (f', let_alpha={FLAGS.let_alpha}'
                                                               if FLAGS.let_alpha is not None else '')
    return f'omniquant(bits={bits}, group_size={gs}, let=True{pairs}' + (f', act_bits={act})' if act else ')')
  weights = f'{method}(bits={bits}, group_size={gs})'
  if method == 'gptq_mse':
    weights = f'gptq(bits={bits}, group_size={gs}, mse=True)'
  how = ('' if FLAGS.act_symmetric else ', symmetric=False') + (f', group_size={FLAGS.act_group_size}'
                                                                if FLAGS.act_group_size else '')
  return weights + (f' > act_quant(bits={act}{how})' if act else '')


def main(argv):
  del argv
  t0 = time.time()
  for name, given, known in (('settings', FLAGS.settings, SETTINGS), ('rotations', FLAGS.rotations, ROTATIONS)):
    if set(given) - set(known):
      raise app.UsageError(f'--{name}={",".join(given)}: unknown {sorted(set(given) - set(known))}; choose from '
                           f'{sorted(known)}.')
  model, params, calib, held_out, ctx, gs, nll = common.llama_recipe_rows(FLAGS)
  gs = gs if FLAGS.small else FLAGS.group_size or None
  fp = nll(model, params)
  rows = []
  for method in FLAGS.methods:
    for rot in FLAGS.rotations:
      for setting in FLAGS.settings:
        recipe = rotation(rot, *SETTINGS[setting], gs) + stage(method, *SETTINGS[setting], gs)
        t = time.time()
        m, p = recipes.run(recipes.parse(recipe), ctx, model, params)
        rows.append({'method': method, 'rotation': rot, 'setting': setting, 'recipe': recipe,
                     'nll': nll(m, p), 'seconds': time.time() - t})
        rows[-1]['ppl'] = math.exp(rows[-1]['nll'])
        print(rows[-1], flush=True)
  table = ['| method | rotation | ' + ' | '.join(FLAGS.settings) + ' |',
           '|---|---|' + '---:|' * len(FLAGS.settings)]
  for method in FLAGS.methods:
    for rot in FLAGS.rotations:
      cells = {r['setting']: r['ppl'] for r in rows if r['method'] == method and r['rotation'] == rot}
      table.append(f'| {method} | {rot} | ' + ' | '.join(f'{cells[s]:.2f}' for s in FLAGS.settings) + ' |')
  table += ['', f'fp32 {math.exp(fp):.2f}; {calib.shape[0]} calibration rows, {held_out.shape[0]} held-out rows of '
            f'{held_out.shape[1] - 1} predictions; group size {gs or "per channel"}; rotation seed {FLAGS.seed}.']
  config = {k: FLAGS[k].value for k in ('model', 'seed', 'calib_rows', 'eval_rows', 'small', 'methods', 'settings',
                                        'rotations', 'group_size', 'r2', 'act_symmetric', 'act_group_size',
                                        'let_pairs', 'let_alpha')}
  common.write(FLAGS.output_dir, config, [{'method': 'fp32', 'nll': fp, 'ppl': math.exp(fp)}] + rows,
               '\n'.join(table), {'seconds': time.time() - t0})
  common.chart(pathlib.Path(FLAGS.output_dir) / 'frontier.png', rows,
               series=lambda r: f"{r['method']} ({r['rotation']})", category='setting', categories=FLAGS.settings,
               value=lambda r: r['ppl'] - math.exp(fp), y_label='perplexity − fp32',
               title=f"{'tiny random Llama' if FLAGS.small else FLAGS.model}: fp32 {math.exp(fp):.2f}")


if __name__ == '__main__':
  app.run(main)
