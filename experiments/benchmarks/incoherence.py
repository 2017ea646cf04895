"""What QuIP's incoherence costs at run time: the forward of a model whose block linears are 2-bit `Quantized`
leaves against the same model with `Incoherent(Quantized)` ones (two fast Walsh–Hadamard transforms around each
quantized matmul), in one run.

    python experiments/benchmarks/incoherence.py                   # fixture, a 768-wide Llama, MiniLM; 8 x 512
    python experiments/benchmarks/incoherence.py --small --repeats=2   # smoke size, seconds

The leaves are built without calibration (identity Hessian: the codes do not change the cost): GPTQ's
`gptq_from_hessian` for the plain model, `quip_layer` for the other. Both forwards are compiled ahead of time and
timed interleaved (`benchlib.interleaved`); the ratio of medians is the cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.benchmarks.benchlib import forward_models, interleaved
from jaxcompress import calibration, core, provenance, quantization

_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per forward.')
_SEQ = flags.DEFINE_integer('seq_len', 512, 'Tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Interleaved timing rounds.')
_SMALL = flags.DEFINE_boolean('small', False, 'Tiny shapes: a smoke test in seconds.')
_BITS = flags.DEFINE_integer('bits', 2, 'Weight bits.')
_OUT = flags.DEFINE_string('out', '', 'Write the results here as JSON (with versions and git revision).')


def _quantized(model, params, leaf):
  """params with every block linear replaced by leaf(i, path, w, identity Hessian)."""
  new = {}
  for i, k in calibration.block_linears(model, params):
    path = f'{model.block_path}/{i}/{k}'
    w = jnp.asarray(core.paths.get(params, path))
    new[path] = leaf(i, k, w, jnp.eye(w.shape[0], dtype=jnp.float32))
  return core.paths.replace(params, new)


def main(argv):
  del argv
  batch, seq = (2, 32) if _SMALL.value else (_BATCH.value, _SEQ.value)
  gs = 16 if _SMALL.value else 128
  cfg = quantization.QuIPConfig(bits=_BITS.value, group_size=gs)
  rows = []
  for name, model, params in forward_models(_SMALL.value):
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    plain_p = _quantized(model, params, lambda i, k, w, h: quantization.gptq_from_hessian(
        w, h, bits=_BITS.value, group_size=gs))
    quip_p = _quantized(model, params, lambda i, k, w, h: quantization.quip_layer(
        w, h, jax.random.fold_in(jax.random.key(0), i), cfg))
    plain = jax.jit(model.apply).lower(plain_p, tokens).compile()
    quip = jax.jit(model.apply).lower(quip_p, tokens).compile()
    t = interleaved({'plain': lambda: plain(plain_p, tokens), 'quip': lambda: quip(quip_p, tokens)}, _REPEATS.value)
    rows.append({'model': name, 'batch': batch, 'seq_len': seq, 'bits': _BITS.value, 'plain_s': t['plain'].median,
                 'quip_s': t['quip'].median, 'ratio': t['quip'].median / t['plain'].median,
                 'spread_pct': max(t['plain'].as_dict()['spread_pct'], t['quip'].as_dict()['spread_pct'])})
    print(rows[-1], flush=True)
  print(f'\n{jax.devices()[0].device_kind} ({jax.default_backend()}), {batch} x {seq} tokens, W{_BITS.value} g{gs}, '
        f'medians of {_REPEATS.value} interleaved rounds')
  print('| model | Quantized forward s | Incoherent(Quantized) s | ratio |\n|---|---:|---:|---:|')
  for r in rows:
    print(f"| {r['model']} | {r['plain_s']:.4f} | {r['quip_s']:.4f} | {r['ratio']:.3f} |")
  if _OUT.value:
    provenance.write_json(_OUT.value, {'rows': rows, 'environment': provenance.environment()})


if __name__ == '__main__':
  app.run(main)
