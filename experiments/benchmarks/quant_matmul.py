"""Batch-1 GEMV through `core.linear`: dense vs weight-only int8 / int4 vs W8A8, as ratios from one run.

    python experiments/benchmarks/quant_matmul.py                 # 8192 x 28672 (a 70B-class MLP), bf16 on GPU/TPU
    python experiments/benchmarks/quant_matmul.py --small         # 2048 x 5632, float32: a CPU size

Every variant is jit-compiled `core.linear(x, w)` with x [--rows, in]: the dense weight (float32 on CPU, bfloat16
on GPU/TPU); `Quantized` W8 (per output channel) and W4 g128 (packed two codes per byte), which on GPU/TPU
dispatch to the Pallas weight-only kernel that `jaxcompress.quantization.kernels.enable()` registers (the weight is never
materialised) and on CPU dequantize inside jit, then dot in float32; and `Int8Linear` W8A8 (per-token int8
activations, int8 x int8 -> int32 dot_general). Calls are interleaved round by round (benchlib.interleaved), so
ratios stay meaningful on a shared host. Batch-1 GEMV is memory bound: on a GPU the ratio to aim for is
bytes(dense) / bytes(quantized), about 2x (W8) and 3.5-4x (W4) against bf16.

No GPU or TPU was available when this was written: the figures in the report come from a 2-core CPU shared with
other work; the script runs unchanged on a GPU (`jax.default_backend()` picks the dtype and the kernel).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxcompress import core, provenance, quantization

from experiments.benchmarks.benchlib import interleaved

_IN = flags.DEFINE_integer('d_in', 8192, 'Input features of the weight.')
_OUT = flags.DEFINE_integer('d_out', 28672, 'Output features of the weight.')
_ROWS = flags.DEFINE_integer('rows', 1, 'Rows of x (1: decode GEMV).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Interleaved rounds after one warm-up call each.')
_SMALL = flags.DEFINE_boolean('small', False, 'CPU size: 2048 x 5632, 10 rounds (explicit flags still win).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weight and input.')
_OUTPUT = flags.DEFINE_string('out', None, 'JSON results path (default: none).')
SMALL = {'d_in': 2048, 'd_out': 5632, 'repeats': 10}


def variants(d_in: int, d_out: int, rows: int, seed: int) -> tuple[dict, jnp.dtype]:
  """{name: zero-argument jitted call} and the dense dtype."""
  dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  kw, kx = jax.random.split(jax.random.key(seed))
  w = (jax.random.normal(kw, (d_in, d_out), jnp.float32) * d_in ** -0.5)
  x = jax.random.normal(kx, (rows, d_in), jnp.float32).astype(dtype)
  leaves = {
      f'dense {jnp.dtype(dtype).name}': w.astype(dtype),
  }
  leaves['W8 per-channel'] = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                          quantization.quantize_weight(w, bits=8, group_size=None, symmetric=True))
  leaves['W4 g128'] = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                   quantization.quantize_weight(w, bits=4, group_size=128))
  leaves['W8A8 int8 x int8'] = quantization.w8a8_layer(w.astype(dtype))
  del w
  fn = jax.jit(core.linear)
  return {k: (lambda v=v: fn(x, v)) for k, v in leaves.items()}, dtype


def main(argv):
  del argv
  quantization.kernels.enable()  # the Pallas weight-only kernel on GPU/TPU (CPU keeps dequantize-then-dot)
  if _SMALL.value:
    for k, v in SMALL.items():
      if not flags.FLAGS[k].present:
        flags.FLAGS[k].value = v
  fns, dtype = variants(_IN.value, _OUT.value, _ROWS.value, _SEED.value)
  timings = interleaved(fns, _REPEATS.value)
  base = next(iter(timings))
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), x [{_ROWS.value}, {_IN.value}] @ '
        f'W [{_IN.value}, {_OUT.value}], {_REPEATS.value} interleaved rounds, load {os.getloadavg()[0]:.1f}')
  print(f'{"variant":22} {"median ms":>10} {"speed vs " + base:>24}')
  result = {}
  for k, t in timings.items():
    ratio = timings[base].median / t.median
    result[k] = {**t.as_dict(), 'speed_ratio': ratio}
    print(f'{k:22} {1e3 * t.median:10.3f} {ratio:24.3f}')
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_OUTPUT.value).write_text(json.dumps({
        'flags': {k: flags.FLAGS[k].value for k in (*SMALL, 'rows', 'seed')}, 'dtype': jnp.dtype(dtype).name,
        'backend': jax.default_backend(), 'results': result, 'environment': provenance.environment()}, indent=1))


if __name__ == '__main__':
  app.run(main)
