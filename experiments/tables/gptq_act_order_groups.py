"""GPTQ act-order with static groups (grids fixed beforehand, groups of consecutive inputs) against the authors'
dynamic groups (the next group_size rows of the act-order, grids formed as the solver reaches them; the leaf holds
g_idx): layer-output error ‖X(W − Ŵ)‖ / ‖XW‖ on random layers with outlier input channels, over seeds.

    python experiments/tables/gptq_act_order_groups.py                 # 5 seeds, 256 x 128, 2048 tokens
    python experiments/tables/gptq_act_order_groups.py --small         # 2 seeds, 64 x 32 (smoke test)
"""

from __future__ import annotations

from experiments.tables import common

from absl import app, flags

common.define_flags('gptq_act_order_groups', model=False)
flags.DEFINE_integer('seeds', 5, 'Random layers per setting.')
flags.DEFINE_list('settings', ['3:32', '4:32', '3:128'], 'bits:group_size pairs.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax.numpy as jnp
  import numpy as np

  from jaxcompress import quantization

  n, out, tokens, seeds = (64, 32, 256, 2) if FLAGS.small else (256, 128, 2048, FLAGS.seeds)
  rows = []
  for setting in FLAGS.settings:
    bits, gs = map(int, setting.split(':'))
    ratios = []
    for seed in range(FLAGS.seed, FLAGS.seed + seeds):
      rng = np.random.default_rng(seed)
      scale = np.where(rng.random(n) < 0.05, 20.0, 1.0) * rng.uniform(0.5, 2.0, n)  # outlier input channels
      x = jnp.asarray((rng.standard_normal((tokens, n)) * scale).astype(np.float32))
      w = jnp.asarray(rng.standard_normal((n, out)).astype(np.float32))
      err = {static: quantization.layer_error(x, w, quantization.gptq_from_hessian(
          w, x.T @ x, bits=bits, group_size=min(gs, n), act_order=True, static_groups=static))
             for static in (True, False)}
      ratios.append(err[True] / err[False])
    rows.append({'setting': f'W{bits} g{min(gs, n)} act-order', 'static / dynamic (mean)': float(np.mean(ratios)),
                 'min': float(np.min(ratios)), 'max': float(np.max(ratios)), 'seeds': seeds})
  shown = [{k: f'{v:.3f}' if isinstance(v, float) else v for k, v in r.items()} for r in rows]
  table = common.markdown(shown, ['setting', 'static / dynamic (mean)', 'min', 'max', 'seeds'])
  common.write(FLAGS.output_dir, {'flags': FLAGS.flag_values_dict()}, rows, table)


if __name__ == '__main__':
  app.run(main)
