"""Seconds per layer for Wanda and SparseGPT, first call (compile included) and steady state.

    python experiments/benchmarks/prune.py                         # 4096 x 4096, 2048 calibration tokens
    python experiments/benchmarks/prune.py --shape=256,1024 --tokens=512
    python experiments/benchmarks/prune.py --small                 # seconds (smoke)

The goal: `sparsegpt_layer` on a 4096 x 4096 layer with 2048 tokens returns its first result, compile included,
in <= 5 s on two CPU cores. Timings on a shared machine are noisy, so a 4096^3-style float32 matmul of the
layer's size is timed in the same run, interleaved, and every figure is also given in units of it.
Writes results.json (with config and environment) into --output_dir.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import benchlib
import jax
import jax.numpy as jnp
from absl import app, flags

from jaxcompress import provenance, pruning

flags.DEFINE_list('shape', ['4096', '4096'], 'Layer kernel shape in,out.')
flags.DEFINE_integer('tokens', 2048, 'Calibration tokens.')
flags.DEFINE_integer('repeats', 2, 'Steady-state calls timed after the first.')
flags.DEFINE_string('pattern', '', "'' (unstructured 50%) or N:M such as 2:4.")
flags.DEFINE_string('output_dir', 'runs/bench_prune', 'Where results.json goes.')
flags.DEFINE_integer('seed', 0, 'Seed of the random layer and inputs.')
flags.DEFINE_bool('small', False, 'A 256 x 256 layer with 256 tokens (smoke mode).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  n_in, n_out = (256, 256) if FLAGS.small else (int(FLAGS.shape[0]), int(FLAGS.shape[1]))
  tokens = 256 if FLAGS.small else FLAGS.tokens
  kw, kx = jax.random.split(jax.random.key(FLAGS.seed))
  w = jax.random.normal(kw, (n_in, n_out), jnp.float32)
  x = jax.random.normal(kx, (tokens, n_in), jnp.float32)
  jax.block_until_ready((w, x))
  pattern = FLAGS.pattern or None
  matmul = jax.jit(lambda a, b: a @ b)
  ref_a = jnp.ones((n_in, n_in), jnp.float32)
  benchlib.timed(matmul, ref_a, w)  # compile the yardstick first

  def sgpt():
    return pruning.sparsegpt_layer(w, x, pattern=pattern).value

  def wanda():
    return pruning.wanda_layer(w, x, pattern=pattern).mask

  results = {'shape': [n_in, n_out], 'tokens': tokens, 'pattern': pattern, 'devices': str(jax.devices()),
             'cpu_count': os.cpu_count()}
  for name, fn in (('sparsegpt', sgpt), ('wanda', wanda)):
    _, first = benchlib.timed(fn)
    steady, yard = [], []
    for _ in range(FLAGS.repeats):  # interleaved with the yardstick: both see the same load
      steady.append(benchlib.timed(fn)[1])
      yard.append(benchlib.timed(matmul, ref_a, w)[1])
    med, ymed = sorted(steady)[len(steady) // 2], sorted(yard)[len(yard) // 2]
    results[name] = {'first_call_s': first, 'steady_s': steady, 'matmul_s': yard,
                     'steady_in_matmuls': med / ymed, 'first_in_matmuls': first / ymed}
    print(f'{name:<10} [{n_in}, {n_out}] x {tokens} tokens: first call (compile included) {first:.2f} s, '
          f'steady {med:.2f} s = {med / ymed:.1f} matmuls of [{n_in},{n_in}]x[{n_in},{n_out}] '
          f'({ymed:.3f} s each now); first call = {first / ymed:.1f} matmuls', flush=True)
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  results['load_average_1min'] = load
  print(f'load average (1 min) {load}; the machine is shared, so compare the matmul units rather than seconds.')
  provenance.write_run_dir(FLAGS.output_dir, config={k: FLAGS[k].value for k in ('shape', 'tokens', 'repeats',
                                                                                  'pattern', 'seed', 'small')},
                           results=results)


if __name__ == '__main__':
  app.run(main)
