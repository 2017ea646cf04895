"""Pruning during training on the causal-LM fixture: gradual magnitude (cubic schedule, a Transform) and RigL
(constant sparsity, the optax wrapper), each run by `train.loop.fit`; held-out perplexity and reached sparsity.

    python experiments/prune_train.py --model=/work/fixture/hf --steps=60
    python experiments/prune_train.py --small                  # a tiny random Llama (smoke)

Writes config.json, environment.json and results.json into --output_dir (each run's checkpoints under it).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from jaxcompress import models, provenance, pruning
from jaxcompress.data import pipeline
from jaxcompress.eval import lm
from jaxcompress.pruning import gradual
from jaxcompress.train import loop, objectives

flags.DEFINE_string('model', 'fixture', "'fixture' or a checkpoint directory (holding training.json too).")
flags.DEFINE_string('output_dir', 'runs/prune_train', 'Where results and the runs go.')
flags.DEFINE_integer('seed', 0, 'Seed of the runs.')
flags.DEFINE_integer('steps', 60, 'Optimizer steps per run.')
flags.DEFINE_integer('batch_size', 16, 'Rows per step.')
flags.DEFINE_float('sparsity', 0.7, 'Target sparsity of every block kernel.')
flags.DEFINE_float('learning_rate', 3e-4, 'AdamW learning rate.')
flags.DEFINE_integer('eval_rows', 128, 'Held-out rows scored.')
flags.DEFINE_bool('small', False, 'A tiny random Llama on random tokens (smoke mode).')
FLAGS = flags.FLAGS


def load():
  rs = np.random.RandomState(FLAGS.seed)
  if FLAGS.small:
    model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    rows = rs.randint(0, 64, (64, 17)).astype(np.int32)
    return model, model.init(jax.random.key(FLAGS.seed)), pipeline.LMBatches(sequences=rows, batch_size=8, seed=FLAGS.seed), rows[:8]
  from experiments import fixture
  model, params = fixture.load(FLAGS.model)
  data_dir = fixture.FIXTURE_DIR if FLAGS.model == 'fixture' else fixture.resolve(FLAGS.model)
  _, train, valid = fixture.data(data_dir, batch_size=FLAGS.batch_size)
  return model, params, train, valid[:FLAGS.eval_rows]


def held_out_ppl(model, params, valid) -> float:
  rows = jnp.asarray(valid)
  nll, count = jax.jit(lm.sequence_nll, static_argnums=0)(model, params, rows[:, :-1], rows[:, 1:],
                                                          jnp.ones(rows[:, 1:].shape, bool))
  return float(np.exp(float(jnp.sum(nll)) / float(jnp.sum(count))))


def main(argv):
  del argv
  model, params, train, valid = load()
  steps = 6 if FLAGS.small else FLAGS.steps
  results = {'dense': held_out_ppl(model, params, valid)}
  print(f'dense held-out perplexity {results["dense"]:.2f}', flush=True)
  end = max(1, int(0.7 * steps))
  runs = {
      'gradual_magnitude': dict(optimizer=optax.adamw(FLAGS.learning_rate), transforms=gradual.gradual_magnitude(
          gradual.GradualConfig(final_sparsity=FLAGS.sparsity, begin_step=1, end_step=end,
                                frequency=max(1, end // 6)))),
      'rigl': dict(optimizer=gradual.sparse_optimizer(optax.adamw(FLAGS.learning_rate), gradual.SparseTrainingConfig(
          method='rigl', sparsity=FLAGS.sparsity, update_every=max(1, steps // 6), end_step=end, seed=FLAGS.seed)),
          transforms=()),
  }
  for name, kw in runs.items():
    cfg = loop.LoopConfig(steps=steps, batch_size=train.batch_size, run_dir=os.path.join(FLAGS.output_dir, name),
                          seed=FLAGS.seed, checkpoint_every=0, progress=False, resume=False,
                          log_every=max(1, steps // 6), async_checkpoint=False)
    result = loop.fit(cfg, model=model, params=params, objective=objectives.causal_lm(model), data=train, **kw)
    trained = result.state.params
    sparsity = pruning.sparsity_of(trained, model.select(trained))
    ppl = held_out_ppl(model, trained, valid)
    results[name] = {'perplexity': ppl, 'sparsity': sparsity, 'steps': steps}
    print(f'{name:<18} sparsity {sparsity:.3f} (target {FLAGS.sparsity})  held-out perplexity {ppl:.2f}', flush=True)
  provenance.write_run_dir(FLAGS.output_dir, config={k: FLAGS[k].value for k in (
      'model', 'seed', 'steps', 'batch_size', 'sparsity', 'learning_rate', 'eval_rows', 'small')}, results=results)


if __name__ == '__main__':
  app.run(main)
