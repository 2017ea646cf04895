"""KIVI's quantized KV cache on the causal-LM fixture: cache bytes and greedy decoding against the float32 cache.

    python experiments/tables/kv_cache.py              # fixture: 64 held-out prompts of 32 tokens, 64 new tokens
    python experiments/tables/kv_cache.py --small      # a tiny random model, seconds

Each format (`models.decode.KVCacheFormat`: int8 / int4 / int2 codes, keys per channel and values per token in
groups of --group_size, the newest --residual tokens in full precision) decodes the same prompts greedily with
`models.generate(kv_cache=...)`. Columns: bytes of the cache for one sequence of --context tokens (codes, float16
scales and minimums, full-precision window; `decode.cache_bytes`), its ratio to the float32 cache, the fraction of
prompts whose first --match_tokens new tokens equal those of the float32 cache, the fraction of all new tokens
equal position by position, and the mean number of new tokens before the first difference.
"""

from __future__ import annotations

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress.models import decode

common.define_flags('kv_cache')
flags.DEFINE_integer('prompts', 64, 'Held-out rows whose first tokens are the prompts.')
flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens.')
flags.DEFINE_integer('new_tokens', 64, 'Greedy tokens generated per prompt.')
flags.DEFINE_integer('match_tokens', 32, 'A prompt agrees when its first this many new tokens are identical.')
flags.DEFINE_integer('group_size', 32, 'KIVI group size G.')
flags.DEFINE_list('residual', ['32', '0'], 'Full-precision windows R to measure.')
flags.DEFINE_integer('context', 2048, 'Tokens of the sequence whose cache bytes are counted.')
FLAGS = flags.FLAGS


def agreement(ref: np.ndarray, out: np.ndarray, first: int) -> dict[str, float]:
  """ref, out: [B, N] new tokens -> prompts identical over the first `first`, token match rate, mean prefix."""
  same = ref == out
  prefix = np.where(same.all(axis=1), same.shape[1], np.argmin(same, axis=1))
  return {'prompts_identical': float(same[:, :first].all(axis=1).mean()), 'token_match': float(same.mean()),
          'mean_identical_prefix': float(prefix.mean())}


def main(argv):
  del argv
  model, params, _, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  prompt_len, new = (8, 8) if FLAGS.small else (FLAGS.prompt_len, FLAGS.new_tokens)
  group = 8 if FLAGS.small else FLAGS.group_size
  first = min(FLAGS.match_tokens, new)
  context = 64 if FLAGS.small else FLAGS.context
  prompt = jnp.asarray(valid[:FLAGS.prompts, :prompt_len], jnp.int32)
  # (format, cache dtype); bfloat16 shows how far plain rounding of the cache moves the greedy text
  formats = {'float32': (None, jnp.float32), 'bfloat16': (None, jnp.bfloat16)}
  for r in FLAGS.residual:
    for bits in (8, 4, 2):
      r_used = int(r) if not FLAGS.small else min(int(r), group)
      formats[f'int{bits} G={group} R={r_used}'] = (
          decode.KVCacheFormat(bits=bits, group_size=group, residual=r_used), jnp.float32)
  rows, ref = [], None
  for name, (fmt, dtype) in formats.items():
    shapes = jax.eval_shape(lambda p, fmt=fmt, dtype=dtype: decode.init_cache(model, p, 1, context, dtype,
                                                                              kv_cache=fmt or 'full'), params)
    out = np.asarray(decode.generate(model, params, prompt, max_new_tokens=new, kv_cache=fmt or 'full',
                                     cache_dtype=dtype))
    out = out[:, prompt_len:]
    ref = out if ref is None else ref
    row = {'cache': name, 'bytes': decode.cache_bytes(shapes), **agreement(ref, out, first)}
    row['ratio'] = rows[0]['bytes'] / row['bytes'] if rows else 1.0
    rows.append(row)
    print(f"{name:18} {row['bytes']:>10} B  {row['ratio']:.2f}x  identical {row['prompts_identical']:.3f}  "
          f"tokens {row['token_match']:.3f}", flush=True)
  columns = ['cache', f'bytes (1 x {context} tokens)', 'vs float32', f'prompts identical (first {first})',
             f'token match ({new} new)', 'mean identical prefix']
  table = common.markdown([{columns[0]: r['cache'], columns[1]: r['bytes'], columns[2]: f"{r['ratio']:.2f}x",
                            columns[3]: f"{r['prompts_identical']:.3f}", columns[4]: f"{r['token_match']:.3f}",
                            columns[5]: f"{r['mean_identical_prefix']:.1f}"} for r in rows], columns)
  print(f'\n{prompt.shape[0]} prompts of {prompt_len} held-out tokens, {new} greedy tokens; cache bytes of one '
        f'sequence of {context} tokens ({model.config.num_layers} layers, {model.config.num_kv_heads} KV heads)\n')
  common.write(FLAGS.output_dir, {'flags': {n: FLAGS[n].value for n in (
      'model', 'seed', 'small', 'prompts', 'prompt_len', 'new_tokens', 'match_tokens', 'group_size', 'residual',
      'context')}}, rows, table)


if __name__ == '__main__':
  app.run(main)
