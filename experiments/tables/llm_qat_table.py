"""LLM-QAT on the causal-LM fixture: quantization-aware training distilled from the float model, against plain
QAT and post-training round-to-nearest, by held-out perplexity of the final quantized weights.

    python experiments/tables/llm_qat_table.py --output_dir runs/llm_qat_table                 # W3 g128, 150 steps each
    python experiments/tables/llm_qat_table.py --bits 4 --steps 300 --output_dir runs/llm_qat_w4
    python experiments/tables/llm_qat_table.py --small --output_dir /tmp/llm_qat_small         # tiny random model

Rows: the float model; PTQ RTN (min-max asymmetric, every block linear, embedding and norms float); QAT: --steps
of causal-LM training on the fixture's training data with `quantization.fake_quant` (straight-through) in the
forward, then the same RTN of the trained float weights; LLM-QAT: the same, but the loss is the KL divergence
to the float model's next-token distribution (`jaxcompress.quantization._src.llm_qat.distillation_objective`, the
teacher's params in TrainState.frozen). Same optimizer (AdamW, --lr, warm-up then cosine), seed and batches for both.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import time

from experiments.tables import common

from absl import app, flags

from jaxcompress import provenance, quantization
from jaxcompress.quantization._src.llm_qat import distillation_objective

common.define_flags('llm_qat_table')
flags.DEFINE_integer('bits', 3, 'Weight bits.')
flags.DEFINE_integer('group_size', 128, 'Rows per scale (per-channel where it does not divide).')
flags.DEFINE_integer('steps', 150, 'Training steps of each QAT run.')
flags.DEFINE_float('lr', 2e-4, 'Peak learning rate.')
flags.DEFINE_integer('eval_rows', 256, 'Held-out rows scored (0: all).')
FLAGS = flags.FLAGS


def rtn(model, params, bits, gs):
  return common.rtn(model.select(params), params, bits, gs)


def train(model, params, data, objective, transform, *, steps, lr, seed, run_dir, frozen=None):
  from jaxcompress.train import loop, optim
  shutil.rmtree(run_dir, ignore_errors=True)
  cfg = loop.LoopConfig(steps=steps, batch_size=data.batch_size, run_dir=str(run_dir), seed=seed,
                        checkpoint_every=0, async_checkpoint=False, progress=False, log_every=max(1, steps // 4),
                        mesh=(1, 1, 1))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, warmup_steps=min(10, steps // 5),
                                                   total_steps=steps))
  return loop.fit(cfg, model=model, params=params, objective=objective, optimizer=opt, data=data,
                  transforms=transform, frozen=frozen).state.params


def main(argv):
  del argv
  from jaxcompress.train import objectives
  t0 = time.time()
  model, params, data, valid = common.model_and_data(FLAGS.model, small=FLAGS.small, seed=FLAGS.seed)
  valid = valid[:FLAGS.eval_rows or None]
  gs = 16 if FLAGS.small else FLAGS.group_size
  steps = 4 if FLAGS.small else FLAGS.steps
  bits = FLAGS.bits
  fit_rules = model.selection_rules()
  qat = lambda: quantization.fake_quant(fit_rules, bits=bits, group_size=gs)
  out = pathlib.Path(FLAGS.output_dir)
  ppl = lambda p: common.perplexity(model, p, valid)
  rows = [{'method': 'float', 'ppl': ppl(params)}, {'method': f'PTQ RTN W{bits} g{gs}', 'ppl': ppl(rtn(model, params,
                                                                                                      bits, gs))}]
  print(rows, flush=True)
  runs = {'QAT (next-token loss)': dict(objective=objectives.causal_lm(model)),
          'LLM-QAT (KL to the float model)': dict(objective=distillation_objective(model), frozen=params)}
  for name, kw in runs.items():
    t = time.time()
    trained = train(model, params, data, transform=qat(), steps=steps, lr=FLAGS.lr, seed=FLAGS.seed,
                    run_dir=out / 'run', **kw)
    rows.append({'method': f'{name}, {steps} steps, then RTN W{bits} g{gs}', 'ppl': ppl(rtn(model, trained, bits, gs)),
                 'float_ppl_after': ppl(trained), 'seconds': time.time() - t})
    print(rows[-1], flush=True)
  shutil.rmtree(out / 'run', ignore_errors=True)
  table = ['| method | held-out ppl (quantized) | float weights ppl | seconds |', '|---|---|---|---|']
  table += [f"| {r['method']} | {r['ppl']:.3f} | {r.get('float_ppl_after', math.nan):.3f} | "
            f"{r.get('seconds', 0):.0f} |" for r in rows]
  text = '\n'.join(table)
  provenance.write_run_dir(out, config={k: FLAGS[k].value for k in ('model', 'seed', 'bits', 'group_size', 'steps',
                                                                     'lr', 'eval_rows', 'small')},
                           results={'rows': rows, 'seconds': time.time() - t0})
  (out / 'table.md').write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
