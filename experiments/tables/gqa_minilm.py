"""Grouped-query attention on all-MiniLM-L6-v2 (12 heads): 12 -> 6 -> 3 key/value heads by mean-pooling
(Ainslie et al. 2023), then a short up-training; embedding fidelity to the original model before and after.

    python experiments/tables/gqa_minilm.py           # kv_heads 6 and 3, 100 up-training steps each
    python experiments/tables/gqa_minilm.py --small   # a few steps on a few sentences (smoke test)

MiniLM's attention is bidirectional (no KV cache), and BERT has no key/value head count: the grouped model is
run as tied heads (`architecture.group_kv_heads` pools, `expand_kv_heads` repeats each pooled head for its
query heads, which is grouped-query attention exactly), and up-training trains the pooled heads through the
`architecture.kv_groups` transform. Up-training distils the original model's sentence embeddings (1 - cosine of
mean-pooled outputs + their MSE, `DistillConfig(output='embedding')`) on fortunes sentences; fidelity is on
held-out sentences (cosine to the original's embedding, and nearest-neighbour agreement). The K/V projection
parameters shrink by 12 / G; this runtime saves no time (the heads are repeated), which the table says.
"""

from __future__ import annotations

import pathlib
import time

from experiments.tables import common

import jax
import numpy as np
from absl import app, flags

from jaxcompress import architecture, distillation, provenance
from jaxcompress.recipes.encoder_runs import fidelity
from jaxcompress.train import loop, optim

common.define_flags('gqa_minilm', model=False)
flags.DEFINE_integer('steps', 100, 'Up-training steps per grouped model.')
flags.DEFINE_integer('batch_size', 32, 'Sentences per step.')
flags.DEFINE_integer('max_len', 64, 'Tokens per sentence (longer ones are cut).')
flags.DEFINE_integer('heldout', 256, 'Held-out sentences for fidelity.')
flags.DEFINE_float('learning_rate', 2e-4, 'Peak up-training learning rate.')
flags.DEFINE_list('kv_heads', ['6', '3'], 'Key/value head counts (each must divide 12).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  steps = 2 if FLAGS.small else FLAGS.steps
  batch_size = 8 if FLAGS.small else FLAGS.batch_size
  model, params, _, held, data = common.minilm_sentences(FLAGS.seed, heldout=FLAGS.heldout, max_len=FLAGS.max_len,
                                                         batch_size=batch_size, small=FLAGS.small)
  n = model.config.num_heads
  hd = model.config.hidden_size // n
  embed = jax.jit(lambda p, x, m: model.sentence_embedding(p, x, m))
  ref = np.asarray(embed(params, *held), np.float64)
  objective = distillation.distillation(model, model, distillation.DistillConfig(output='embedding', alpha=1.0))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=FLAGS.learning_rate,
                                                   warmup_steps=max(steps // 10, 1), total_steps=steps))
  rows = [{'kv_heads': n, 'kv_params_per_layer': 2 * (model.config.hidden_size + 1) * n * hd,
           'before': fidelity(ref, ref), 'after': None, 'train_s': None}]
  for g in [int(k) for k in FLAGS.kv_heads]:
    grouped = architecture.group_kv_heads(model, params, g)
    before = fidelity(ref, np.asarray(embed(architecture.expand_kv_heads(model, grouped, g), *held), np.float64))
    lc = loop.LoopConfig(steps=steps, batch_size=batch_size, run_dir=str(out / 'runs' / f'kv{g}'), seed=FLAGS.seed,
                         checkpoint_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False,
                         resume=False, log_every=max(steps // 5, 1))
    t0 = time.perf_counter()
    r = loop.fit(lc, model=model, params=grouped, objective=objective, optimizer=opt, data=data, frozen=params,
                 transforms=architecture.kv_groups(model, g))
    secs = time.perf_counter() - t0
    after = fidelity(ref, np.asarray(embed(architecture.expand_kv_heads(model, r.state.params, g), *held),
                                     np.float64))
    rows.append({'kv_heads': g, 'kv_params_per_layer': 2 * (model.config.hidden_size + 1) * g * hd,
                 'before': before, 'after': after, 'train_s': secs})
    print(f"{g:2d} KV heads: cosine {before['cosine']:.4f} -> {after['cosine']:.4f}, nn agreement "
          f"{before['nn_agreement']:.3f} -> {after['nn_agreement']:.3f}", flush=True)
  fmt = lambda f: '' if f is None else f"{f['cosine']:.4f} / {f['nn_agreement']:.3f}"
  table = ('| key/value heads | K/V params per layer | cosine / NN agreement, pooled | after up-training | '
           'train s |\n|---|---|---|---|---|\n' +
           ''.join(f"| {r['kv_heads']}{' (original)' if r['kv_heads'] == n else ''} | {r['kv_params_per_layer']} | "
                   f"{fmt(r['before'])} | {fmt(r['after'])} | "
                   f"{'' if r['train_s'] is None else round(r['train_s'])} |\n" for r in rows))
  provenance.write_run_dir(out, config={'flags': {k: FLAGS[k].value for k in (
      'seed', 'steps', 'batch_size', 'max_len', 'heldout', 'learning_rate', 'kv_heads', 'small')}, 'steps': steps},
      results={'rows': rows})
  (out / 'table.md').write_text(table)
  print(f'\nall-MiniLM-L6-v2, {n} heads of {hd}; up-training {steps} steps x {batch_size} sentences, distilling the '
        f'original embeddings; {len(held[0])} held-out sentences (bidirectional attention: no KV cache; tied heads '
        'save K/V parameters, not time, in this runtime)\n')
  print(table)


if __name__ == '__main__':
  app.run(main)
