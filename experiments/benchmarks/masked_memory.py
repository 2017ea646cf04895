"""Memory and forward speed of a 50%-masked Llama: dense vs `Masked` vs `core.masked.compact` (PackedMasked).

    python experiments/benchmarks/masked_memory.py            # the ~100M-parameter Llama of vs_torch.py
    python experiments/benchmarks/masked_memory.py --small    # seconds

Every attention and MLP kernel keeps its larger-magnitude half (a per-kernel median threshold); the embedding
(the tied head) stays dense. Bytes are `core.stats.totals(params).memory` (the arrays held). Forward: jitted
`model.apply` on --batch x --seq tokens, interleaved calls, median seconds; ratios are dense / other (above 1:
faster than dense).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core
from jaxcompress.core import masked
from jaxcompress.models import llama

_SMALL = flags.DEFINE_boolean('small', False, 'Smoke size: 2 blocks, 128 wide, vocab 1024.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Rows of the timed forward.')
_SEQ = flags.DEFINE_integer('seq', 128, 'Tokens per row of the timed forward.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls of each form (interleaved).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weights and tokens.')


def half_masked(params):
  def mask(path, w):
    if not path.endswith('_proj/kernel'):
      return w
    return core.Masked(w, jnp.abs(w) >= jnp.median(jnp.abs(w)))
  return core.map_with_path(mask, params)


def main(argv: list[str]) -> None:
  del argv
  hidden, layers, vocab = (128, 2, 1024) if _SMALL.value else (768, 12, 32000)
  model = llama.Llama(llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                        num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 192 or 1,
                                        max_position_embeddings=1024, tie_embeddings=True))
  dense = model.init(jax.random.key(_SEED.value))
  forms = {'dense': dense, 'Masked': half_masked(dense)}
  forms['compact'] = masked.compact(forms['Masked'])
  tokens = jnp.asarray(np.random.RandomState(_SEED.value).randint(0, vocab, (_BATCH.value, _SEQ.value)), jnp.int32)
  apply = jax.jit(model.apply)
  outs = {name: np.asarray(apply(p, tokens)) for name, p in forms.items()}  # also compiles each form
  times = {name: [] for name in forms}
  for _ in range(_REPEATS.value):
    for name, p in forms.items():
      start = time.perf_counter()
      jax.block_until_ready(apply(p, tokens))
      times[name].append(time.perf_counter() - start)
  print(f'Llama {sum(x.size for x in jax.tree.leaves(dense)) / 1e6:.1f}M parameters, attention and MLP kernels '
        f'50% masked; forward {_BATCH.value}x{_SEQ.value}, median of {_REPEATS.value}')
  print(f'{"form":<10} {"memory MiB":>11} {"/ dense":>8} {"forward s":>10} {"speed vs dense":>15} {"max |logit diff|":>17}')
  base_mem = core.stats.totals(dense).memory
  base_t = statistics.median(times['dense'])
  for name, p in forms.items():
    mem, t = core.stats.totals(p).memory, statistics.median(times[name])
    diff = float(np.max(np.abs(outs[name] - outs['Masked']))) if name != 'dense' else float('nan')
    print(f'{name:<10} {mem / 2**20:>11.1f} {mem / base_mem:>8.2f} {t:>10.3f} {base_t / t:>15.2f} {diff:>17.2g}')


if __name__ == '__main__':
  app.run(main)
