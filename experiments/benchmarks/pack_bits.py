"""Packing quantized codes for `compressed.jxc`: `core.serialize.pack_bits` / `unpack_bits` against the bit-plane
NumPy code that defines the format (one uint8 plane per bit, `np.packbits(bitorder='little')`), as ratios from one
run.

    python experiments/benchmarks/pack_bits.py            # one 3072 x 8192 kernel (a 3B Llama's MLP), 2..8 bits
    python experiments/benchmarks/pack_bits.py --small    # 256 x 768: the smoke size

Both give the same bytes (checked on every call here). Every load of a compressed.jxc unpacks every quantized
kernel, and every save packs it, so this is most of the CPU time of `core.serialize` on a low-bit model.
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from experiments.benchmarks import benchlib  # noqa: E402
from jaxcompress.core import serialize  # noqa: E402

_SHAPE = flags.DEFINE_list('shape', ['3072', '8192'], 'Shape of the kernel whose codes are packed.')
_BITS = flags.DEFINE_list('bits', ['2', '3', '4', '8'], 'Code widths.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved rounds after one warm-up call each.')
_SMALL = flags.DEFINE_boolean('small', False, 'A 256 x 768 kernel, 2 rounds.')
_OUTPUT = flags.DEFINE_string('out', None, 'JSON results path (default: none).')


def planes_pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """The format by its definition: bit b of code i is stream bit i·bits + b, little-endian within each byte."""
  planes = (codes.reshape(-1)[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder='little')


def planes_unpack(data: np.ndarray, bits: int, n: int) -> np.ndarray:
  planes = np.unpackbits(data, count=n * bits, bitorder='little').reshape(n, bits)
  return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def main(argv) -> None:
  del argv
  shape = (256, 768) if _SMALL.value else tuple(int(d) for d in _SHAPE.value)
  repeats = 2 if _SMALL.value else _REPEATS.value
  n = int(np.prod(shape))
  rows = []
  print(f'{shape[0]} x {shape[1]} codes, median of {repeats} interleaved calls (CPU)')
  print('| bits | pack s (planes) | pack s | speed-up | unpack s (planes) | unpack s | speed-up |\n'
        '|---:|---:|---:|---:|---:|---:|---:|')
  for bits in (int(b) for b in _BITS.value):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=shape, dtype=np.uint8)
    data = serialize.pack_bits(codes, bits)
    if not (np.array_equal(data, planes_pack(codes, bits))
            and np.array_equal(serialize.unpack_bits(data, bits, n), codes.reshape(-1))):
      raise AssertionError(f'{bits} bits: pack_bits differs from the bit-plane definition')
    t = benchlib.interleaved({'pack_planes': lambda: planes_pack(codes, bits),
                              'pack': lambda: serialize.pack_bits(codes, bits),
                              'unpack_planes': lambda: planes_unpack(data, bits, n),
                              'unpack': lambda: serialize.unpack_bits(data, bits, n)}, repeats)
    m = {k: v.median for k, v in t.items()}
    rows.append({'bits': bits, **{f'{k}_s': v for k, v in m.items()}})
    print(f"| {bits} | {m['pack_planes']:.3f} | {m['pack']:.3f} | {m['pack_planes'] / m['pack']:.1f}× | "
          f"{m['unpack_planes']:.3f} | {m['unpack']:.3f} | {m['unpack_planes'] / m['unpack']:.1f}× |")
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).write_text(json.dumps({'shape': shape, 'rows': rows}, indent=1))


if __name__ == '__main__':
  app.run(main)
