"""Time `gptq_layer` on one layer: first result (compile included), then a second call (compiled).

    python experiments/benchmarks/gptq.py                      # 4096 x 4096, 2048 tokens, W4 g128
    python experiments/benchmarks/gptq.py --in_features 512 --out_features 512 --tokens 256
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import quantization

flags.DEFINE_integer('in_features', 4096, 'input dimension of the layer')
flags.DEFINE_integer('out_features', 4096, 'output dimension of the layer')
flags.DEFINE_integer('tokens', 2048, 'calibration tokens')
flags.DEFINE_integer('bits', 4, 'weight bits')
flags.DEFINE_integer('group_size', 128, 'rows per scale (0: per-channel)')
flags.DEFINE_bool('act_order', False, 'visit rows by decreasing diag(H)')
flags.DEFINE_integer('seed', 0, 'PRNG seed')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  kw, kx = jax.random.split(jax.random.key(FLAGS.seed))
  w = jax.random.normal(kw, (FLAGS.in_features, FLAGS.out_features), jnp.float32) * 0.02
  x = jax.random.normal(kx, (FLAGS.tokens, FLAGS.in_features), jnp.float32)
  w, x = jax.block_until_ready((w, x))
  gs = FLAGS.group_size or None
  times = []
  for _ in range(2):
    t = time.perf_counter()
    leaf = quantization.gptq_layer(w, x, bits=FLAGS.bits, group_size=gs, act_order=FLAGS.act_order)
    jax.block_until_ready(leaf)
    times.append(time.perf_counter() - t)
  err = quantization.layer_error(x, w, leaf)
  print(f'gptq_layer {FLAGS.in_features}x{FLAGS.out_features}, {FLAGS.tokens} tokens, W{FLAGS.bits} g{gs}: '
        f'first result (compile included) {times[0]:.2f} s, compiled {times[1]:.2f} s, '
        f'relative output error {err:.4f}; devices {jax.devices()}, {np.__name__} host')


if __name__ == '__main__':
  app.run(main)
