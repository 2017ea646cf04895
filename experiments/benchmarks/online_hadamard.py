"""What QuaRot's online Hadamard on down_proj's input costs: the forward of a model against the same model after
`quarot(online=True)` (the same function; the fused rotations cost nothing at run time), in one run.

    python experiments/benchmarks/online_hadamard.py             # fixture, a 768-wide Llama, MiniLM; 8 x 512
    python experiments/benchmarks/online_hadamard.py --small --repeats=2   # smoke size, seconds

Both forwards are compiled ahead of time and timed interleaved (`benchlib.interleaved`), so load from other work
falls on both alike; the ratio of medians is the cost. The transform is `core.hadamard_transform`: log2 butterfly
stages of adds over the power-of-two part, one small matmul for a Paley factor (768 = 12 · 64, 3072 = 12 · 256).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from experiments.benchmarks.benchlib import forward_models, interleaved
from jaxcompress import provenance, quantization

_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per forward.')
_SEQ = flags.DEFINE_integer('seq_len', 512, 'Tokens per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 15, 'Interleaved timing rounds.')
_SMALL = flags.DEFINE_boolean('small', False, 'Tiny shapes: a smoke test in seconds.')
_OUT = flags.DEFINE_string('out', '', 'Write the results here as JSON (with versions and git revision).')


def main(argv):
  del argv
  batch, seq = (2, 32) if _SMALL.value else (_BATCH.value, _SEQ.value)
  rows = []
  for name, model, params in forward_models(_SMALL.value):
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    rmodel, rparams = quantization.quarot(model, params, config=quantization.QuaRotConfig(online=True),
                                          key=jax.random.key(0))
    plain = jax.jit(model.apply).lower(params, tokens).compile()
    online = jax.jit(rmodel.apply).lower(rparams, tokens).compile()
    err = float(np.linalg.norm(online(rparams, tokens) - plain(params, tokens)) / np.linalg.norm(plain(params, tokens)))
    t = interleaved({'plain': lambda: plain(params, tokens), 'online': lambda: online(rparams, tokens)},
                    _REPEATS.value)
    rows.append({'model': name, 'batch': batch, 'seq_len': seq, 'plain_s': t['plain'].median,
                 'online_s': t['online'].median, 'ratio': t['online'].median / t['plain'].median,
                 'spread_pct': max(t['plain'].as_dict()['spread_pct'], t['online'].as_dict()['spread_pct']),
                 'logit_rel_err': err})
    print(rows[-1], flush=True)
  print(f'\n{jax.devices()[0].device_kind} ({jax.default_backend()}), {batch} x {seq} tokens, medians of '
        f'{_REPEATS.value} interleaved rounds')
  print('| model | forward s | with online Hadamard s | ratio | logits rel err |\n|---|---:|---:|---:|---:|')
  for r in rows:
    print(f"| {r['model']} | {r['plain_s']:.4f} | {r['online_s']:.4f} | {r['ratio']:.3f} | "
          f"{r['logit_rel_err']:.1e} |")
  if _OUT.value:
    provenance.write_json(_OUT.value, {'rows': rows, 'environment': provenance.environment()})


if __name__ == '__main__':
  app.run(main)
