"""Converts the causal-LM fixture's attention to fewer key/value heads by mean-pooling (Ainslie et al. 2023),
then up-trains briefly; perplexity before and after, KV-cache bytes, and decode tokens/s.

    python experiments/tables/gqa_convert.py              # fixture: 4 query heads, 2 KV heads -> 1 (MQA)
    python experiments/tables/gqa_convert.py --small      # a tiny random MHA model, seconds

Up-training runs the same steps, batches and optimizer on the original (as a control) and on the converted
model, so the table separates what up-training alone gives from what the conversion costs. Decode speed is
`models.generate` (KV-cache, greedy), timed interleaved in one run (the host may be shared).
"""

from __future__ import annotations

import pathlib

from experiments.tables import common

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import architecture, models, provenance
from jaxcompress.recipes import lm_runs
from jaxcompress.train import objectives

common.define_flags('gqa_convert')
flags.DEFINE_integer('steps', 100, 'Up-training steps.')
flags.DEFINE_integer('batch_size', 16, 'Sequences per step.')
flags.DEFINE_float('learning_rate', 5e-4, 'Peak up-training learning rate.')
flags.DEFINE_list('kv_heads', [], 'Targets (default: every proper divisor of the key/value head count).')
flags.DEFINE_integer('eval_rows', 64, 'Held-out rows scored.')
flags.DEFINE_integer('decode_batch', 8, 'Sequences decoded at once for tokens/s.')
flags.DEFINE_integer('decode_tokens', 64, 'New tokens per decode.')
FLAGS = flags.FLAGS


def decode_rates(cands: dict, prompt, new_tokens: int, repeats: int) -> dict[str, float]:
  """{name: tokens/s} of greedy KV-cache decoding, each candidate timed interleaved with the others."""
  fns = {k: (lambda m=m, p=p: models.generate(m, p, prompt, max_new_tokens=new_tokens)) for k, (m, p) in
         cands.items()}
  return {k: prompt.shape[0] * new_tokens / s for k, s in common.interleaved(fns, repeats).items()}


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  steps = 2 if FLAGS.small else FLAGS.steps
  if FLAGS.small:
    model, params, data, valid = lm_runs.small_setup(FLAGS.seed)
  else:
    model, params, data, valid = lm_runs.fixture_setup(FLAGS.model, FLAGS.batch_size)
  valid = valid[:FLAGS.eval_rows]
  k = model.config.num_kv_heads
  targets = [int(t) for t in FLAGS.kv_heads] or [d for d in range(k - 1, 0, -1) if k % d == 0]
  cands = {f'{k} KV heads (original)': (model, params)}
  for t in targets:
    cands[f'{t} KV heads'] = architecture.convert_to_gqa(model, params, t)
  rows = []
  max_len = data.seq_len
  for name, (m, p) in cands.items():
    before = lm_runs.heldout_nll(m, p, valid)
    trained, secs = lm_runs.train(name.split()[0] + 'kv', m, p, objectives.causal_lm(m), data, steps=steps,
                                  lr=FLAGS.learning_rate, seed=FLAGS.seed, out=out)
    after = lm_runs.heldout_nll(m, trained, valid)
    rows.append({'model': name, 'kv_heads': m.config.num_kv_heads, 'ppl_before': float(np.exp(before)),
                 'ppl_after': float(np.exp(after)),
                 'kv_cache_bytes': architecture.kv_cache_bytes(m, p, 1, max_len, jnp.bfloat16)})
    cands[name] = (m, trained)
    print(f"{name:22s} ppl {rows[-1]['ppl_before']:9.2f} -> {rows[-1]['ppl_after']:9.2f} after {steps} steps",
          flush=True)
  prompt = jnp.asarray(valid[:FLAGS.decode_batch, :16], jnp.int32)
  rates = decode_rates(cands, prompt, 4 if FLAGS.small else FLAGS.decode_tokens, 2 if FLAGS.small else 5)
  base = rows[0]
  for r, (name, rate) in zip(rows, rates.items()):
    r.update(decode_tokens_s=rate, decode_speedup=rate / rates[base['model']],
             kv_cache_ratio=base['kv_cache_bytes'] / r['kv_cache_bytes'])
  table = ('| attention | perplexity converted | after up-training | KV cache bytes/seq (bf16, T=%d) | cache '
           'ratio | decode tokens/s | decode speed-up |\n|---|---|---|---|---|---|---|\n' % max_len +
           ''.join(f"| {r['model']} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | {r['kv_cache_bytes']} | "
                   f"{r['kv_cache_ratio']:.1f}x | {r['decode_tokens_s']:.0f} | {r['decode_speedup']:.2f}x |\n"
                   for r in rows))
  provenance.write_run_dir(out, config={'flags': {n: FLAGS[n].value for n in (
      'model', 'seed', 'steps', 'batch_size', 'learning_rate', 'kv_heads', 'eval_rows', 'decode_batch',
      'decode_tokens', 'small')}}, results={'rows': rows})
  (out / 'table.md').write_text(table)
  print(f'\n{steps} up-training steps x {data.tokens_per_batch} tokens each; decode batch {prompt.shape[0]}, '
        f'{4 if FLAGS.small else FLAGS.decode_tokens} new tokens, interleaved medians on a shared host\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
