"""Seconds per layer for Wanda and SparseGPT, first call (compile included) and steady state.

    python experiments/benchmarks/prune.py                         # 4096 x 4096, 2048 calibration tokens
    python experiments/benchmarks/prune.py --shape=256,1024 --tokens=512
    python experiments/benchmarks/prune.py --small                 # seconds (smoke)
    python experiments/benchmarks/prune.py --model --width_scale=0.25   # Llama-3.2-1B shapes, block by block

The goal: `sparsegpt_layer` on a 4096 x 4096 layer with 2048 tokens returns its first result, compile included,
in <= 5 s on two CPU cores. Prints the first result (compile included, the first thing this process compiles)
and the steady time, then each phase (XᵀX, inverse-Hessian factor, row loop, and each program's compile time),
in wall and process CPU seconds: on a shared machine the wall times are inflated, the CPU times much less.
Writes results.json (with config and environment) into --output_dir.
"""

from __future__ import annotations

import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, models, provenance, pruning
from jaxcompress.pruning._src import masks

from experiments.benchmarks import benchlib, solverlib

flags.DEFINE_list('shape', ['4096', '4096'], 'Layer kernel shape in,out.')
flags.DEFINE_integer('tokens', 2048, 'Calibration tokens.')
flags.DEFINE_integer('repeats', 2, 'Steady-state calls timed after the first.')
flags.DEFINE_string('pattern', '', "'' (unstructured 50%) or N:M such as 2:4.")
flags.DEFINE_string('output_dir', 'runs/bench_prune', 'Where results.json goes.')
flags.DEFINE_integer('seed', 0, 'Seed of the random layer and inputs.')
flags.DEFINE_bool('small', False, 'A 256 x 256 layer with 256 tokens (smoke mode).')
flags.DEFINE_bool('model', False, 'Prune a whole Llama-3.2-1B-shaped model block by block instead.')
flags.DEFINE_float('width_scale', 0.25, '--model: hidden and MLP widths (and heads) times this.')
flags.DEFINE_integer('layers', 16, '--model: transformer blocks (Llama-3.2-1B has 16).')
flags.DEFINE_integer('vocab', 128256, '--model: vocabulary size (Llama-3.2-1B: 128256, tied embeddings).')
flags.DEFINE_integer('batch', 4, '--model: sequences per calibration batch.')
flags.DEFINE_integer('seq_len', 256, '--model: tokens per sequence (--tokens in all, in whole batches).')
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


def current_rss() -> int:
  """Resident bytes now (Linux /proc; 0 elsewhere)."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except OSError:
    return 0


def model_run():
  """SparseGPT over a whole Llama-3.2-1B-shaped model at reduced width, block by block through
  `calibration.run_sequential` (offload=True): seconds per block and peak RSS against the parameter bytes."""
  scale = FLAGS.width_scale
  heads = max(1, round(32 * scale))
  cfg = models.LlamaConfig(vocab_size=FLAGS.vocab, hidden_size=64 * heads, intermediate_size=int(8192 * scale),
                           num_layers=FLAGS.layers, num_heads=heads, num_kv_heads=max(1, heads // 4),
                           max_position_embeddings=FLAGS.seq_len, tie_embeddings=True, rope_theta=500000.0)
  model = models.Llama(cfg)
  # random weights built here (no checkpoint), moved to the host: only the block being pruned is on the device
  params = jax.device_get(jax.jit(model.init)(jax.random.key(FLAGS.seed)))
  param_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))
  rs = np.random.RandomState(FLAGS.seed)
  batches = [rs.randint(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq_len)).astype(np.int32)
             for _ in range(max(1, FLAGS.tokens // (FLAGS.batch * FLAGS.seq_len)))]
  print(f'Llama-3.2-1B shapes at width x{scale}: hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, '
        f'{cfg.num_layers} blocks, vocab {cfg.vocab_size}; {param_bytes / 2**20:.0f} MiB of float32 parameters; '
        f'{len(batches)} batches of [{FLAGS.batch}, {FLAGS.seq_len}] tokens', flush=True)
  marks = {}
  rss_during = [0]

  def on_step(phase, block, batch):
    rss_during[0] = max(rss_during[0], current_rss())
    if block >= 0:
      marks.setdefault(block, [time.perf_counter(), 0.0])[1] = time.perf_counter()

  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t0, c0 = time.perf_counter(), time.process_time()
  _, out = pruning.sparsegpt(model, params, batches, offload=True, on_step=on_step)
  jax.block_until_ready(out)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  starts = sorted(marks)
  per_block = [marks[b][1] - (marks[b - 1][1] if b - 1 in marks else t0) for b in starts]
  kept = [float(np.mean(np.asarray(leaf.mask))) for leaf in jax.tree.leaves(out, is_leaf=core.is_compressed)
          if core.is_compressed(leaf)]
  print('seconds per block: ' + ' '.join(f'{t:.1f}' for t in per_block))
  print(f'total {wall:.1f} s wall, {cpu:.1f} s CPU; first block {per_block[0]:.1f} s (compiles), later blocks '
        f'median {sorted(per_block[1:])[len(per_block[1:]) // 2] if len(per_block) > 1 else float("nan"):.1f} s; '
        f'{len(kept)} kernels pruned, kept fraction {np.mean(kept):.3f}')
  print(f'peak RSS {rss / 2**20:.0f} MiB (peak before pruning, from building the random model, {rss0 / 2**20:.0f} '
        f'MiB); largest RSS sampled after each pruning step {rss_during[0] / 2**20:.0f} MiB; against '
        f'{param_bytes / 2**20:.0f} MiB of parameters: {rss_during[0] / param_bytes:.2f}x; load average (1 min) '
        f'{os.getloadavg()[0]:.1f}')


if __name__ == '__main__':
  app.run(main)
