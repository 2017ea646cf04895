"""Perplexity of the causal-LM fixture after low-rank factorization of its block kernels, per method.

SVD vs FWSVD vs ASVD vs SVD-LLM at 20%, 30% and 50% parameter reduction of the block kernels, before and after
the same recovery budget: the block kernels (LowRank factors, and kernels the allocation left dense) trained with
loop.fit, everything else frozen. The dense row is the control: the same training of the uncompressed kernels,
which must not move the perplexity much (a recovery recipe that harms the dense model measures the recipe, not
the factorization). The default recipe continues the fixture's own pretraining where its schedule ended: batch
16, AdamW, peak rate 3e-4 (the end of its cosine schedule) with a short warm-up, on the training rows.

Allocation. A rank-r factorization of a d×d kernel stores r·2d parameters, so it saves only below r = d/2; a
uniform cut (every kernel keeps the same fraction, `RankRule(keep=)`) is possible but spends the reduction
evenly. The table's main allocation is one parameter budget over all block kernels (`RankRule(budget=)`):
greedy by the σ² each parameter buys in the method's own weighted spectrum, with kernels whose rank would
reach break-even left dense. The uniform cut's perplexity (same ranks for every method) is a column, and a
second table gives each method's allocation per kernel kind.

`out_err` is the layer-output error Σ‖X (W − Ŵ)‖² / Σ‖X W‖² over all factorized kernels, with X the dense
model's calibration inputs: the quantity SVD-LLM minimizes exactly per kernel. It says where a method's
perplexity comes from when it does not follow that order.

    python experiments/tables/lowrank_table.py --output_dir=runs/lowrank_table          # the fixture
    python experiments/tables/lowrank_table.py --small --output_dir=/tmp/lr             # smoke run in seconds
"""

from __future__ import annotations

import functools
import pathlib
import re
import time

from absl import app, flags

from experiments.tables import common

common.define_flags('lowrank_table')
flags.DEFINE_list('reductions', ['0.2', '0.3', '0.5'], 'Fractions of the block kernels\' parameters removed.')
flags.DEFINE_list('methods', ['svd', 'fwsvd', 'asvd', 'svd_llm'], 'Factorization methods.')
flags.DEFINE_enum('allocation', 'budget', ['budget', 'uniform'], 'Rank allocation that gets recovery training.')
flags.DEFINE_boolean('other_allocation', True, 'Also measure the other allocation\'s perplexity (before '
                     'recovery; a column).')
flags.DEFINE_integer('calib_batches', 8, 'Training batches for calibration statistics and Fisher rows.')
flags.DEFINE_integer('steps', 40, 'Recovery steps (block kernels only); 0 skips recovery.')
flags.DEFINE_integer('batch_size', 16, 'Rows per recovery step (the fixture was trained with 16).')
flags.DEFINE_float('learning_rate', 3e-4, 'Recovery peak rate (the fixture\'s schedule ended at 3e-4).')
FLAGS = flags.FLAGS

# Recovery trains the blocks' kernels, dense ('kernel') or factored ('kernel/a', 'kernel/b'); nothing else.
BLOCK_KERNELS_RE = r'^layers/.*/kernel(/a|/b)?$'


def output_error(compressed, params, stats, paths) -> float:
  """Σ tr(ΔᵀXᵀXΔ) / Σ tr(WᵀXᵀXW) over `paths` (Δ = W − Ŵ; XᵀX from the calibration hessian observer)."""
  import numpy as np

  from jaxcompress import core
  flat_c, flat_d = core.flatten(compressed), core.flatten(core.resolve(params))
  num = den = 0.0
  for p in paths:
    h = np.asarray(stats[p]['h']['xtx'], np.float64)
    w = np.asarray(core.materialize(flat_d[p]), np.float64)
    d = w - np.asarray(core.materialize(flat_c[p]), np.float64)
    num += float(np.sum(d * (h @ d)))
    den += float(np.sum(w * (h @ w)))
  return num / den


def allocation(ranks, sel) -> dict[str, str]:
  """{kernel kind: mean fraction of dense parameters kept ('D' counts kernels left dense)}."""
  import numpy as np
  kinds: dict[str, list[float]] = {}
  for p, (i, o) in zip(sel.paths, sel.shapes):
    kind = re.sub(r'^.*/([^/]+)/kernel$', r'\1', p).replace('_proj', '')
    r = ranks.get(p)
    kinds.setdefault(kind, []).append(1.0 if r is None else r * (i + o) / (i * o))
  return {k: f'{np.mean(v):.2f}' + (f' ({sum(x == 1.0 for x in v)}D)' if any(x == 1.0 for x in v) else '')
          for k, v in kinds.items()}


def main(argv):
  del argv
  import jax

  from jaxcompress import calibration, core, lowrank
  from jaxcompress.train import state

  steps = min(FLAGS.steps, 2) if FLAGS.small else FLAGS.steps
  model, params, train, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  out = pathlib.Path(FLAGS.output_dir)
  calib = common.calibration_batches(train, 2 if FLAGS.small else FLAGS.calib_batches)
  t0 = time.time()
  stats = calibration.calibrate(model, params, [{'tokens': b['tokens']} for b in calib],
                                calibration.combine(h=calibration.hessian(), m=calibration.abs_mean()))
  fisher = (lowrank.fisher_rows(model, params, [{'inputs': b['inputs'], 'targets': b['targets']} for b in calib])
            if 'fwsvd' in FLAGS.methods else None)  # FWSVD's weights; no other method reads them
  print(f'calibration statistics{"" if fisher is None else " and Fisher rows"}: {time.time() - t0:.1f}s')
  dense_ppl = common.perplexity(model, params, valid)
  total = core.stats.totals(params).stored
  recover = functools.partial(common.recover, model, train=train, steps=steps, seed=FLAGS.seed,
                              trainable=state.matching(BLOCK_KERNELS_RE), learning_rate=FLAGS.learning_rate,
                              batch_size=FLAGS.batch_size)
  # the control's training is the factorized rows' (the same recover call): --small trains those only
  control = None if FLAGS.small else common.perplexity(model, recover(params=params, run_dir=out / 'runs' / 'dense'),
                                                       valid)
  rows = [{'method': 'dense', 'reduction': 0.0, 'kept': 1.0, 'model_kept': 1.0, 'ppl': dense_ppl,
           **({'ppl_recovered': control} if control is not None else {})}]
  alloc_rows = []
  print(f'dense perplexity {dense_ppl:.2f}' + ('' if control is None else
                                               f'; after the recovery recipe (control) {control:.2f}'), flush=True)
  sel = model.select(params)
  dense_kernels = sum(a * b for a, b in sel.shapes)
  for red in [float(r) for r in FLAGS.reductions]:
    uniform_ranks = lowrank.RankRule(keep=1 - red)
    for method in FLAGS.methods:
      st = {'svd': None, 'fwsvd': fisher}.get(method, stats)
      rules = {'budget': lowrank.RankRule(budget=1 - red), 'uniform': uniform_ranks}
      if not FLAGS.other_allocation:
        rules = {FLAGS.allocation: rules[FLAGS.allocation]}
      got = {}
      for name, rule in rules.items():
        t0 = time.time()
        compressed = lowrank.compress(params, config=lowrank.SVDConfig(method=method, ranks=rule), stats=st)
        got[name] = (compressed, time.time() - t0, common.perplexity(model, compressed, valid))
      compressed, seconds, ppl = got[FLAGS.allocation]
      other = 'uniform' if FLAGS.allocation == 'budget' else 'budget'
      ranks = {p: lowrank.ranks_of(compressed).get(p) for p in sel.paths}
      kept = sum(r * sum(s) if r is not None else s[0] * s[1]
                 for r, s in zip(ranks.values(), sel.shapes)) / dense_kernels
      recovered = recover(params=compressed, run_dir=out / 'runs' / f'{method}_{red}')
      ppl_rec = common.perplexity(model, recovered, valid)
      row = {'method': method, 'reduction': red, 'kept': round(kept, 3),
             'model_kept': round(core.stats.totals(compressed).stored / total, 3),
             'out_err': round(output_error(compressed, params, stats, sel.paths), 4),
             **({f'ppl_{other}': got[other][2]} if other in got else {}), 'ppl': ppl, 'ppl_recovered': ppl_rec, 'factorize_s': round(seconds, 1)}
      rows.append(row)
      alloc_rows.append({'method': method, 'reduction': red, **allocation(ranks, sel)})
      print(row, flush=True)
      jax.clear_caches()
  other = 'uniform' if FLAGS.allocation == 'budget' else 'budget'
  shown = [{**r, 'out_err': f"{r['out_err']:.4f}"} if 'out_err' in r else r for r in rows]
  table = common.markdown(
      shown, ['method', 'reduction', 'kept', 'model_kept', 'out_err',
              *([f'ppl_{other}'] if FLAGS.other_allocation else []), 'ppl', 'ppl_recovered', 'factorize_s'])
  table += (f'\n\nppl: held-out perplexity ({valid.shape[0]} rows) with the {FLAGS.allocation} allocation; '
            f'ppl_recovered: after {steps} steps (batch {FLAGS.batch_size}, peak rate {FLAGS.learning_rate:g}, '
            'cosine) of training the block kernels only (LowRank factors and kernels left dense; the same budget '
            'for every row; the dense row is the control: the same training without factorization); '
            + (f'ppl_{other}: the {other} allocation, before recovery; ' if FLAGS.other_allocation else '') +
            'kept: fraction of the block kernels\' '
            'parameters stored; model_kept: of the whole model (embeddings included); out_err: layer-output '
            'error Σ‖X(W−Ŵ)‖²/Σ‖XW‖² on the calibration inputs. Where FWSVD trails plain SVD, '
            'experiments/tables/fwsvd_check.py measures why (Fisher weights on the input or the output side of W, and '
            'from 4× the calibration batches).')
  kinds = [k for k in alloc_rows[0] if k not in ('method', 'reduction')] if alloc_rows else []
  table += (f'\n\nAllocation ({FLAGS.allocation}): mean fraction of each kernel kind\'s dense parameters kept '
            '(nD: n kernels left dense)\n\n' + common.markdown(alloc_rows, ['method', 'reduction', *kinds]))
  common.write(str(out), {'flags': FLAGS.flag_values_dict()}, rows, table, extra={'allocation': alloc_rows})


if __name__ == '__main__':
  app.run(main)
