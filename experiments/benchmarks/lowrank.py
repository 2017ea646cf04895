"""Forward speed of rank-r layers vs dense ones, at the rank where the FLOPs halve: a ratio measured in one run.

For a kernel [in, out] the rank r = in·out / (2 (in + out)) makes the two thin matmuls x·a·b cost half the
FLOPs of x·W. Dense and low-rank calls are interleaved (dense, low-rank, dense, ...) so load on a shared
machine hits both alike; the speed-up is the ratio of their medians.

    python experiments/benchmarks/lowrank.py                       # batch 8 x 512 tokens, Llama-like shapes
    python experiments/benchmarks/lowrank.py --small               # smoke size
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, lowrank

flags.DEFINE_integer('batch', 8, 'Sequences per call.')
flags.DEFINE_integer('seq_len', 512, 'Tokens per sequence.')
flags.DEFINE_list('shapes', ['1024x1024', '1024x4096', '4096x1024'], 'Kernel shapes in x out.')
flags.DEFINE_integer('repeats', 20, 'Timed calls of each kind (interleaved).')
flags.DEFINE_boolean('small', False, 'Smoke size (seconds).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  batch, seq, repeats = (2, 64, 3) if FLAGS.small else (FLAGS.batch, FLAGS.seq_len, FLAGS.repeats)
  shapes = ['64x256'] if FLAGS.small else FLAGS.shapes
  print(f'device: {jax.devices()[0].device_kind}; x: [{batch * seq}, in] float32; interleaved medians of '
        f'{repeats} calls (the machine may be shared: compare ratios, not times)')
  print(f'{"shape":>12} {"rank":>6} {"FLOPs ratio":>12} {"dense ms":>10} {"rank-r ms":>10} {"speed-up":>9}')
  key = jax.random.key(0)
  for shape in shapes:
    d_in, d_out = (int(s) for s in shape.split('x'))
    r = d_in * d_out // (2 * (d_in + d_out))
    kw, kx = jax.random.split(jax.random.fold_in(key, d_in * 7919 + d_out))
    w = jax.random.normal(kw, (d_in, d_out), jnp.float32) / np.sqrt(d_in)
    lr = lowrank.factorize(w, r)
    x = jax.random.normal(kx, (batch * seq, d_in), jnp.float32)
    f = jax.jit(core.linear)
    dense_t, low_t = [], []
    jax.block_until_ready((f(x, w), f(x, lr)))
    for _ in range(repeats):
      for weight, times in ((w, dense_t), (lr, low_t)):
        t = time.perf_counter()
        jax.block_until_ready(f(x, weight))
        times.append(time.perf_counter() - t)
    flops = core.matmul_flops(lr) / core.matmul_flops(w)
    d, l = np.median(dense_t), np.median(low_t)
    print(f'{shape:>12} {r:>6} {flops:>12.3f} {d * 1e3:>10.2f} {l * 1e3:>10.2f} {d / l:>8.2f}x')


if __name__ == '__main__':
  app.run(main)
