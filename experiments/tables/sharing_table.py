"""Cross-layer sharing on the causal-LM fixture: stored parameters, bytes on disk and perplexity in one table.

ALBERT-style sharing of all blocks, groups of 2 consecutive blocks, groups by weight similarity, and groups of 2
plus per-layer LoRA deltas (relaxed recursive sharing); each initialised by averaging its group's weights, then
given the same recovery budget (every floating parameter trained with loop.fit; gradients of shared storage are
summed over its uses). The dense row is the control: the same training without sharing. The default recipe
continues the fixture's own pretraining where its schedule ended (batch 16, AdamW, peak rate 3e-4 with a short
warm-up and cosine decay, on the training rows), which leaves the dense model where it was.

    python experiments/tables/sharing_table.py --output_dir=runs/sharing_table
    python experiments/tables/sharing_table.py --small --output_dir=/tmp/sh
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from experiments.tables import common

common.define_flags('sharing_table')
flags.DEFINE_integer('steps', 100, 'Recovery steps; 0 skips recovery.')
flags.DEFINE_integer('batch_size', 16, 'Rows per recovery step (the fixture was trained with 16).')
flags.DEFINE_float('learning_rate', 3e-4, 'Recovery peak rate (the fixture\'s schedule ended at 3e-4).')
flags.DEFINE_integer('delta_rank', 8, 'Rank of the per-layer LoRA deltas.')
flags.DEFINE_list('variants', [], 'Run only these variants (dense, albert_all, groups_of_2, similarity, '
                  'groups_of_2_lora, albert_all_lora); default all.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from jaxcompress import core, sharing
  from jaxcompress.train import loop

  steps = min(FLAGS.steps, 2) if FLAGS.small else FLAGS.steps
  model, params, train, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  out = pathlib.Path(FLAGS.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  n = len(params['layers'])
  similar = sharing.similarity_groups(params, max(1, n // 2))
  key = loop.rng_stream(FLAGS.seed, 'deltas')
  variants = {
      'dense': lambda: params,
      'albert_all': lambda: sharing.share_blocks(params, sharing.all_blocks(n)),
      'groups_of_2': lambda: sharing.share_blocks(params, sharing.consecutive_groups(n, 2)),
      f'similarity {similar}': lambda: sharing.share_blocks(params, similar),
      f'groups_of_2 + LoRA r{FLAGS.delta_rank}': lambda: sharing.add_deltas(
          sharing.share_blocks(params, sharing.consecutive_groups(n, 2)), key, rank=FLAGS.delta_rank),
      f'albert_all + LoRA r{FLAGS.delta_rank}': lambda: sharing.add_deltas(
          sharing.share_blocks(params, sharing.all_blocks(n)), key, rank=FLAGS.delta_rank),
  }
  rows = []
  for i, (name, make) in enumerate(variants.items()):
    ident = name.split(' ')[0] + ('_lora' if 'LoRA' in name else '')
    if FLAGS.variants and ident not in FLAGS.variants:
      continue
    p = make()
    totals = core.stats.totals(p)
    disk = core.serialize.save(out / f'variant{i}.safetensors', p)
    file_bytes = (out / f'variant{i}.safetensors').stat().st_size
    ppl = common.perplexity(model, p, valid)
    recovered = common.recover(model, p, train, steps=steps, seed=FLAGS.seed,
                               run_dir=out / 'runs' / f'variant{i}', learning_rate=FLAGS.learning_rate,
                               batch_size=FLAGS.batch_size)
    row = {'variant': name, 'stored_params': totals.stored, 'tensor_bytes': disk, 'file_bytes': file_bytes,
           'ppl': ppl, 'ppl_recovered': common.perplexity(model, recovered, valid)}
    rows.append(row)
    print(row, flush=True)
    jax.clear_caches()
  table = common.markdown(rows, ['variant', 'stored_params', 'tensor_bytes', 'file_bytes', 'ppl',
                                        'ppl_recovered'])
  table += (f'\n\nstored_params / tensor_bytes: each shared tensor counted once (core.stats, core.serialize); '
            f'file_bytes: the core.serialize file on disk; ppl: held-out perplexity ({valid.shape[0]} rows) right '
            f'after sharing (averaged weights); ppl_recovered: after {steps} steps (batch {FLAGS.batch_size}, '
            f'peak rate {FLAGS.learning_rate:g}, cosine) of training all parameters (shared storage gets the sum '
            'of its uses\' gradients; the dense row is the control: the same training without sharing).')
  common.write(str(out), {'flags': FLAGS.flag_values_dict()}, rows, table)


if __name__ == '__main__':
  app.run(main)
