"""Seconds per layer for Wanda and SparseGPT, first call (compile included) and steady state.

    python experiments/benchmarks/prune.py                         # 4096 x 4096, 2048 calibration tokens
    python experiments/benchmarks/prune.py --shape=256,1024 --tokens=512
    python experiments/benchmarks/prune.py --small                 # seconds (smoke)

The goal: `sparsegpt_layer` on a 4096 x 4096 layer with 2048 tokens returns its first result, compile included,
in <= 5 s on two CPU cores. Prints the first result (compile included, the first thing this process compiles)
and the steady time, then each phase (XᵀX, inverse-Hessian factor, row loop, and each program's compile time),
in wall and process CPU seconds: on a shared machine the wall times are inflated, the CPU times much less.
Writes results.json (with config and environment) into --output_dir.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import benchlib
import solverlib
import jax
import jax.numpy as jnp
from absl import app, flags

from jaxcompress import provenance, pruning
from jaxcompress.pruning import masks

flags.DEFINE_list('shape', ['4096', '4096'], 'Layer kernel shape in,out.')
flags.DEFINE_integer('tokens', 2048, 'Calibration tokens.')
flags.DEFINE_integer('repeats', 2, 'Steady-state calls timed after the first.')
flags.DEFINE_string('pattern', '', "'' (unstructured 50%) or N:M such as 2:4.")
flags.DEFINE_string('output_dir', 'runs/bench_prune', 'Where results.json goes.')
flags.DEFINE_integer('seed', 0, 'Seed of the random layer and inputs.')
flags.DEFINE_bool('small', False, 'A 256 x 256 layer with 256 tokens (smoke mode).')
flags.DEFINE_bool('model', False, 'Prune a whole Llama config block by block instead (see --width_scale).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.model:
    return model_run()
  n_in, n_out = (256, 256) if FLAGS.small else (int(FLAGS.shape[0]), int(FLAGS.shape[1]))
  tokens = 256 if FLAGS.small else FLAGS.tokens
  kw, kx = jax.random.split(jax.random.key(FLAGS.seed))
  w = jax.random.normal(kw, (n_in, n_out), jnp.float32)
  x = jax.random.normal(kx, (tokens, n_in), jnp.float32)
  jax.block_until_ready((w, x))
  pattern = FLAGS.pattern or None

  def sgpt():
    return pruning.sparsegpt_layer(w, x, pattern=pattern).value

  def wanda():
    return pruning.wanda_layer(w, x, pattern=pattern).mask

  results = {'shape': [n_in, n_out], 'tokens': tokens, 'pattern': pattern, 'devices': str(jax.devices()),
             'cpu_count': os.cpu_count()}
  # SparseGPT first, in a fresh process: its first call pays every compile it needs
  results['sparsegpt'] = solverlib.first_and_steady(sgpt, FLAGS.repeats)
  results['wanda'] = solverlib.first_and_steady(wanda, FLAGS.repeats)
  p = masks.parse_pattern(pattern, caller='prune benchmark')
  nm = p if isinstance(p, tuple) else None
  block = min(-(-128 // nm[1]) * nm[1] if nm else 128, n_in)
  parts = solverlib.phases(w, x, 'sparsegpt', sparsity=0.5, nm=nm, block_size=block)
  results['sparsegpt_phases'] = parts
  print(f'[{n_in}, {n_out}] x {tokens} tokens, pattern {pattern or "50% unstructured"}:')
  print(solverlib.report('sparsegpt_layer', results['sparsegpt'], parts))
  wt = results['wanda']
  print(f"wanda_layer: first {wt['first_wall_s']:.2f} s wall {wt['first_cpu_s']:.2f} s CPU; steady "
        f"{min(wt['steady_wall_s']):.2f} s wall {min(wt['steady_cpu_s']):.2f} s CPU")
  matmul = jax.jit(lambda a, b: a @ b)
  ref_a = jnp.ones((n_in, n_in), jnp.float32)
  benchlib.timed(matmul, ref_a, w)
  _, mm_wall, mm_cpu = solverlib.wall_cpu(lambda: matmul(ref_a, w))
  results['matmul'] = {'wall_s': mm_wall, 'cpu_s': mm_cpu}
  print(f'yardstick: one [{n_in},{n_in}]x[{n_in},{n_out}] float32 matmul {mm_wall:.3f} s wall {mm_cpu:.3f} s CPU; '
        f"SparseGPT first result = {results['sparsegpt']['first_cpu_s'] / mm_cpu:.1f} matmuls of CPU time")
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
  results['load_average_1min'] = load
  print(f'load average (1 min) {load}: on a shared machine the wall times are inflated; the CPU times less so.')
  provenance.write_run_dir(FLAGS.output_dir, config={k: FLAGS[k].value for k in ('shape', 'tokens', 'repeats',
                                                                                  'pattern', 'seed', 'small')},
                           results=results)


def model_run():
  raise NotImplementedError('--model')


if __name__ == '__main__':
  app.run(main)
