"""Why FWSVD does not beat plain SVD on the causal-LM fixture: which side the Fisher weights go on, and how many
calibration batches estimate them.

FWSVD weights one side of the kernel W [in, out] (y = x W) by √ of its summed squared gradients. `lowrank.svd`
weights the input rows, I_j = Σ_k Σ_batches (∂L/∂W_jk)²; implementations of the paper differ (its "rows" are the
rows of a PyTorch weight [out, in] in some, of [in, out] in others), so this script also measures the output
side, I_k = Σ_j Σ_batches (∂L/∂W_jk)², factorized as the input side of Wᵀ, and a 4× larger calibration set.
Perplexity before recovery, with the budget allocation of experiments/tables/lowrank_table.py and with the uniform cut
(the same ranks for every method, so only the per-kernel factorization differs).

    python experiments/tables/fwsvd_check.py --output_dir=runs/fwsvd_check
    python experiments/tables/fwsvd_check.py --small --output_dir=/tmp/fw     # a random tiny model (smoke)
"""

from __future__ import annotations

from absl import app, flags

from experiments.tables import common

common.define_flags('fwsvd_check')
flags.DEFINE_list('reductions', ['0.3', '0.5'], 'Fractions of the block kernels\' parameters removed.')
flags.DEFINE_list('calib_batches', ['8', '32'], 'Calibration batch counts the Fisher is estimated from.')
FLAGS = flags.FLAGS


def squared_gradients(model, params, batches, paths):
  """{path: Σ_batches (∂L/∂W)² [in, out]} of the mean next-token cross-entropy of each batch."""
  import jax
  import jax.numpy as jnp

  from jaxcompress import core
  from jaxcompress.eval import lm

  @jax.jit
  def sq(p, inputs, targets):
    g = core.flatten(jax.grad(lambda q: jnp.mean(lm.token_nll(model.apply(q, inputs), targets)))(p))
    return {k: jnp.square(g[k]) for k in paths}

  total = None
  for b in batches:
    got = sq(params, jnp.asarray(b['inputs']), jnp.asarray(b['targets']))
    total = got if total is None else jax.tree.map(jnp.add, total, got)
  return total


def compress_side(params, sel, scale, rule, side: str):
  """params with each selected kernel factorized minimising ‖diag(scale)(W − Ŵ)‖ (side 'in') or
  ‖(W − Ŵ) diag(scale)‖ (side 'out', the input side of Wᵀ); scale None is plain SVD."""
  import numpy as np

  from jaxcompress import core, lowrank
  weights = sel.get(core.resolve(params))
  side_of = (lambda w: w) if side == 'in' else (lambda w: w.T)
  spectra = {p: np.asarray(lowrank.spectrum(side_of(weights[p]), scale[p])) for p in sel.paths}
  shapes = {p: tuple(side_of(weights[p]).shape) for p in sel.paths}
  ranks = lowrank.choose_ranks(rule, spectra, shapes)

  def one(p, w):
    if ranks[p] is None:
      return w
    f = lowrank.factorize(side_of(weights[p]), ranks[p], scale[p])
    return f if side == 'in' else core.LowRank(a=f.b.T, b=f.a.T)
  return sel.map(one, params)


def main(argv):
  del argv
  import jax.numpy as jnp

  from jaxcompress import lowrank

  model, params, train, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  sel = model.select(params)
  plain = {p: None for p in sel.paths}
  rows = []
  for n in [2] if FLAGS.small else [int(c) for c in FLAGS.calib_batches]:
    g = squared_gradients(model, params, common.calibration_batches(train, n), sel.paths)
    scales = {'in': {p: lowrank.fisher_scale(jnp.sum(g[p], 1)) for p in sel.paths},
              'out': {p: lowrank.fisher_scale(jnp.sum(g[p], 0)) for p in sel.paths}}
    for red in [float(r) for r in FLAGS.reductions]:
      for name, rule in (('budget', lowrank.RankRule(budget=1 - red)), ('uniform', lowrank.RankRule(keep=1 - red))):
        row = {'calib_batches': n, 'reduction': red, 'allocation': name}
        for side in ('in', 'out'):
          row[f'fwsvd_{side}'] = common.perplexity(
              model, compress_side(params, sel, scales[side], rule, side), valid)
        if n == (2 if FLAGS.small else int(FLAGS.calib_batches[0])):
          row['svd'] = common.perplexity(model, compress_side(params, sel, plain, rule, 'in'), valid)
        rows.append(row)
        print(row, flush=True)
  table = common.markdown(rows, ['calib_batches', 'reduction', 'allocation', 'svd', 'fwsvd_in', 'fwsvd_out'])
  table += (f'\n\nHeld-out perplexity ({valid.shape[0]} rows, dense '
            f'{common.perplexity(model, params, valid):.2f}) right after factorization, no recovery. '
            'fwsvd_in: Fisher weights on the input rows of W [in, out] (lowrank.svd); fwsvd_out: on the output '
            'columns; svd: plain SVD (no calibration). budget: one parameter budget over all block kernels, greedy '
            'by each weighted spectrum; uniform: the same ranks for every method.')
  common.write(FLAGS.output_dir, {'flags': FLAGS.flag_values_dict()}, rows, table)


if __name__ == '__main__':
  app.run(main)
