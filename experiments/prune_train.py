"""Pruning during training on the causal-LM fixture, each method run by `train.loop.fit` with the same budget
(steps, batch, AdamW learning rate): gradual magnitude (cubic schedule, a Transform), hard movement (learned
scores, top-k to the cubic schedule, weights kept whole), soft movement (learned scores, a penalty instead of a
target), SET and RigL (the optax wrapper, starting from the magnitude mask of the pretrained weights unless
--sparse_init=random, the papers' start from scratch). The trained params
end as `core.Masked` kernels; the table gives the sparsity each reached, the held-out perplexity, and which
share of each kernel's largest pretrained weights (the 1 - sparsity largest |W|) the mask kept.

    python experiments/prune_train.py --steps=60
    python experiments/prune_train.py --small                  # a tiny random Llama (smoke)

Soft movement has no sparsity target: --soft_penalty (λ) sets where it lands (larger: sparser). Both movement rows
give their scores Adam at --score_learning_rate.
Writes config.json, environment.json, results.json and table.md into --output_dir (each run's checkpoints under it).
"""

from __future__ import annotations

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from jaxcompress import core, models, provenance, pruning
from jaxcompress.data import pipeline
from jaxcompress.eval import lm
# The modules (`pruning.gradual` and `pruning.movement` are the recipe methods built on them).
from jaxcompress.pruning._src import gradual, movement
from jaxcompress.train import loop, objectives

flags.DEFINE_string('model', 'fixture', "'fixture' or a checkpoint directory (holding training.json too).")
flags.DEFINE_string('output_dir', 'runs/prune_train', 'Where results and the runs go.')
flags.DEFINE_integer('seed', 0, 'Seed of the runs.')
flags.DEFINE_integer('steps', 60, 'Optimizer steps per run.')
flags.DEFINE_integer('batch_size', 16, 'Rows per step.')
flags.DEFINE_float('sparsity', 0.7, 'Target sparsity of every block kernel.')
flags.DEFINE_float('learning_rate', 3e-4, 'AdamW learning rate.')
flags.DEFINE_float('soft_penalty', 10.0, 'Soft movement: λ on the mean σ(S) of the scores (larger: sparser).')
flags.DEFINE_float('score_learning_rate', 1e-2, 'Hard and soft movement: Adam step size of the scores.')
flags.DEFINE_enum('sparse_init', 'magnitude', ['magnitude', 'random'],
                  "SET / RigL step-0 mask: 'magnitude' (largest pretrained |W|) or 'random' (from scratch).")
flags.DEFINE_list('methods', ['gradual_magnitude', 'movement', 'soft_movement', 'set', 'rigl'], 'Rows to run.')
flags.DEFINE_integer('eval_rows', 128, 'Held-out rows scored.')
flags.DEFINE_bool('small', False, 'A tiny random Llama on random tokens (smoke mode).')
FLAGS = flags.FLAGS


def load():
  rs = np.random.RandomState(FLAGS.seed)
  if FLAGS.small:
    model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    rows = rs.randint(0, 64, (64, 17)).astype(np.int32)
    train = pipeline.LMBatches(sequences=rows, batch_size=8, seed=FLAGS.seed)
    return model, model.init(jax.random.key(FLAGS.seed)), train, rows[:8]
  from jaxcompress.recipes import fixture
  model, params = fixture.load(FLAGS.model)
  data_dir = fixture.FIXTURE_DIR if FLAGS.model == 'fixture' else fixture.resolve(FLAGS.model)
  _, train, valid = fixture.data(data_dir, batch_size=FLAGS.batch_size)
  return model, params, train, valid[:FLAGS.eval_rows]


def held_out_ppl(model, params, valid) -> float:
  rows = jnp.asarray(valid)
  nll, count = jax.jit(lm.sequence_nll, static_argnums=0)(model, params, rows[:, :-1], rows[:, 1:],
                                                          jnp.ones(rows[:, 1:].shape, bool))
  return float(np.exp(float(jnp.sum(nll)) / float(jnp.sum(count))))


def large_kept(dense, trained, paths, sparsity: float) -> float:
  """Fraction of each kernel's (1 - sparsity) largest dense |W| that the trained mask keeps (magnitude: ~1)."""
  kept = total = 0
  dense, trained = core.flatten(dense), core.flatten(trained)
  for p in paths:
    a = np.abs(np.asarray(dense[p]))
    big = a >= np.quantile(a, sparsity)
    kept += int((np.asarray(trained[p].mask) & big).sum())
    total += int(big.sum())
  return kept / max(total, 1)


def main(argv):
  del argv
  model, params, train, valid = load()
  steps = 6 if FLAGS.small else FLAGS.steps
  results = {'dense': held_out_ppl(model, params, valid)}
  print(f'dense held-out perplexity {results["dense"]:.2f}', flush=True)
  end = max(1, int(0.7 * steps))
  every = max(1, end // 6)
  adamw = lambda: optax.adamw(FLAGS.learning_rate)

  def sparse(method):
    return gradual.sparse_optimizer(adamw(), gradual.SparseTrainingConfig(
        method=method, sparsity=FLAGS.sparsity, init=FLAGS.sparse_init, update_every=max(1, steps // 6),
        end_step=end, seed=FLAGS.seed))

  # Hard movement: the kept count follows the cubic schedule every step, as the paper.
  hard = movement.HardMovementConfig(sparsity=FLAGS.sparsity, begin_step=1, end_step=end, update_every=1,
                                     score_learning_rate=FLAGS.score_learning_rate)

  soft = movement.SoftMovementConfig(penalty=FLAGS.soft_penalty, score_learning_rate=FLAGS.score_learning_rate)
  # name: (fit arguments, start params, final TrainState -> params with core.Masked kernels)
  runs = {
      'gradual_magnitude': (dict(optimizer=adamw(), transforms=gradual.gradual_magnitude(gradual.GradualConfig(
          final_sparsity=FLAGS.sparsity, begin_step=1, end_step=end, frequency=every))), params,
          lambda s: gradual.as_masked(s.params, s.transform_state)),
      'movement': (dict(optimizer=movement.hard_movement_optimizer(adamw(), hard),
                        transforms=movement.topk_schedule(hard)), movement.with_scores(params, hard),
                   lambda s: movement.to_masked(s.params)),
      'soft_movement': (dict(optimizer=movement.soft_movement_optimizer(adamw(), soft)),
                        movement.with_scores(params, soft), lambda s: movement.to_masked(s.params)),
      'set': (dict(optimizer=sparse('set')), params,
              lambda s: gradual.as_masked(s.params, gradual.sparse_masks(s.opt_state))),
      'rigl': (dict(optimizer=sparse('rigl')), params,
               lambda s: gradual.as_masked(s.params, gradual.sparse_masks(s.opt_state))),
  }
  unknown = sorted(set(FLAGS.methods) - set(runs))
  if unknown:
    raise app.UsageError(f'--methods: unknown {unknown}; choose from {", ".join(runs)}.')
  runs = {k: v for k, v in runs.items() if k in FLAGS.methods}
  for name, (kw, start, finish) in runs.items():
    cfg = loop.LoopConfig(steps=steps, batch_size=train.batch_size, run_dir=os.path.join(FLAGS.output_dir, name),
                          seed=FLAGS.seed, checkpoint_every=0, progress=False, resume=False,
                          log_every=max(1, steps // 6), async_checkpoint=False)
    result = loop.fit(cfg, model=model, params=start, objective=objectives.causal_lm(model), data=train,
                      **{'transforms': (), **kw})
    trained = finish(result.state)
    sel = model.select(trained)
    if not all(isinstance(w, core.Masked) for w in sel.get(trained).values()):
      raise RuntimeError(f'{name}: the trained block kernels are not all core.Masked.')
    sparsity = pruning.sparsity_of(trained, sel)
    ppl = held_out_ppl(model, trained, valid)
    target = 'none (λ=%g)' % FLAGS.soft_penalty if name == 'soft_movement' else f'{FLAGS.sparsity}'
    large = large_kept(params, trained, sel.paths, FLAGS.sparsity)
    results[name] = {'perplexity': ppl, 'sparsity': sparsity, 'target': target, 'steps': steps,
                     'large_kept': large}
    print(f'{name:<18} sparsity {sparsity:.3f} (target {target})  held-out perplexity {ppl:.2f}  '
          f'largest {1 - FLAGS.sparsity:.0%} of |W| kept {large:.3f}', flush=True)
  lines = ['| method | target sparsity | reached sparsity | held-out perplexity | largest weights kept |',
           '|---|---|---|---|---|', f'| dense | - | 0 | {results["dense"]:.2f} | 1 |']
  lines += [f'| {k} | {r["target"]} | {r["sparsity"]:.3f} | {r["perplexity"]:.2f} | {r["large_kept"]:.3f} |'
            for k, r in results.items() if k != 'dense']
  table = '\n'.join(lines)
  print(table)
  provenance.write_run_dir(FLAGS.output_dir, config={k: FLAGS[k].value for k in (
      'model', 'seed', 'steps', 'batch_size', 'sparsity', 'learning_rate', 'soft_penalty', 'score_learning_rate',
      'sparse_init', 'methods', 'eval_rows', 'small')}, results=results)
  with open(os.path.join(FLAGS.output_dir, 'table.md'), 'w') as f:
    f.write(table + '\n')


def console():
  """The `jaxcompress-prune-train` command."""
  app.run(main)


if __name__ == '__main__':
  console()
