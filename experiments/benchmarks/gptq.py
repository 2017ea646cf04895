"""Time `gptq_layer` on one layer: first result (compile included), steady calls, and each phase.

    python experiments/benchmarks/gptq.py                      # 4096 x 4096, 2048 tokens, W4 per-channel
    python experiments/benchmarks/gptq.py --group_size=128     # W4 g128
    python experiments/benchmarks/gptq.py --in_features 512 --out_features 512 --tokens 256

The goal: the first result, compile included, in <= 5 s on two CPU cores for 4096 x 4096 with 2048 tokens.
Phases (XᵀX, inverse-Hessian factor, row loop, each program's compile time) are printed in wall and process CPU
seconds: on a shared machine the wall times are inflated, the CPU times much less.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxcompress import quantization

from experiments.benchmarks import solverlib

flags.DEFINE_integer('in_features', 4096, 'input dimension of the layer')
flags.DEFINE_integer('out_features', 4096, 'output dimension of the layer')
flags.DEFINE_integer('tokens', 2048, 'calibration tokens')
flags.DEFINE_integer('bits', 4, 'weight bits')
flags.DEFINE_integer('group_size', 0, 'rows per scale (0: per-channel, the default of gptq_layer)')
flags.DEFINE_bool('act_order', False, 'visit rows by decreasing diag(H)')
flags.DEFINE_integer('repeats', 2, 'steady calls timed after the first')
flags.DEFINE_integer('seed', 0, 'PRNG seed')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  kw, kx = jax.random.split(jax.random.key(FLAGS.seed))
  w = jax.random.normal(kw, (FLAGS.in_features, FLAGS.out_features), jnp.float32) * 0.02
  x = jax.random.normal(kx, (FLAGS.tokens, FLAGS.in_features), jnp.float32)
  w, x = jax.block_until_ready((w, x))
  gs = FLAGS.group_size or None
  opts = dict(bits=FLAGS.bits, group_size=gs, act_order=FLAGS.act_order)
  leaf = None

  def run():
    nonlocal leaf
    leaf = quantization.gptq_layer(w, x, **opts)
    return leaf

  times = solverlib.first_and_steady(run, FLAGS.repeats)
  parts = solverlib.phases(w, x, 'gptq', symmetric=False, block_size=min(128, FLAGS.in_features), **opts)
  err = quantization.layer_error(x, w, leaf)
  print(f'{FLAGS.in_features}x{FLAGS.out_features}, {FLAGS.tokens} tokens, W{FLAGS.bits} '
        f'{"g" + str(gs) if gs else "per-channel"}{", act-order" if FLAGS.act_order else ""}; devices {jax.devices()}')
  print(solverlib.report('gptq_layer', times, parts))
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  print(f'relative output error {err:.4f}; load average (1 min) {load}: on a shared machine the wall times are '
        'inflated; the CPU times less so.')


if __name__ == '__main__':
  app.run(main)
