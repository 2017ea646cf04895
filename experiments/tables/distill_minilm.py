"""Distils all-MiniLM-L6-v2 (6 layers) into a 3-layer student on fortunes sentences; embedding fidelity and
nearest-neighbour agreement with the teacher on held-out sentences, and the student's measured speed-up.

    python experiments/tables/distill_minilm.py           # 200 steps per row, a few minutes on a CPU
    python experiments/tables/distill_minilm.py --small   # a few steps on a few sentences (smoke test)

Rows (same student shape; every trained row the same steps, batches and optimizer):
  layers, untrained      the teacher's blocks --layers (every other), embeddings shared: no training at all
  layers + contrastive   the same init trained WITHOUT the teacher: in-batch InfoNCE between two token-masked
                         views of each sentence (an unsupervised sentence-embedding objective, SimCSE-style)
  random + KD            a random init of the student shape (embeddings kept from the teacher), distilled
  layers + KD            the teacher's blocks, distilled: 1 - cosine of the mean-pooled embeddings + last hidden
                         state MSE + last-layer Q/K/V relation KL (MiniLM) + hidden states through the layer map
Fidelity: cosine of student and teacher sentence embeddings (mean-pooled, normalized), and the fraction of
held-out sentences whose nearest neighbour (by cosine, among the held-out set) is the same under both models.
Speed: teacher over student embedding time, jitted, timed interleaved in one run (the host may be shared).
"""

from __future__ import annotations

import pathlib
import time

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import distillation, provenance
from jaxcompress.distillation import students
from jaxcompress.models import mean_pool
from jaxcompress.recipes.encoder_runs import fidelity, time_ratio
from jaxcompress.train import loop, optim

common.define_flags('distill_minilm', model=False)
flags.DEFINE_integer('steps', 200, 'Optimizer steps per trained row.')
flags.DEFINE_integer('batch_size', 32, 'Sentences per step.')
flags.DEFINE_integer('max_len', 64, 'Tokens per sentence (longer ones are cut).')
flags.DEFINE_integer('heldout', 256, 'Held-out sentences for fidelity.')
flags.DEFINE_float('learning_rate', 5e-4, 'Peak learning rate.')
flags.DEFINE_list('layers', [], 'Teacher blocks the student keeps (default every other: 0, 2, 4).')
flags.DEFINE_float('relation_weight', 1.0, 'Weight of the Q/K/V relation KL.')
flags.DEFINE_float('hidden_weight', 1.0, 'Weight of the intermediate hidden-state MSE over the layer map.')
FLAGS = flags.FLAGS


def contrastive(model, mask_id: int, *, mask_rate: float = 0.15, temperature: float = 0.05):
  """In-batch InfoNCE between two views of each sentence, each with mask_rate of its real tokens replaced by
  [MASK]: a teacher-free sentence-embedding objective. Sums over rows."""
  def objective(params, frozen, batch, rng):
    del frozen
    x, m = batch['inputs'], batch['attention_mask']
    views = []
    for k in jax.random.split(rng, 2):
      drop = (jax.random.uniform(k, x.shape) < mask_rate) & (m > 0)
      drop = drop.at[:, 0].set(False)  # keep [CLS]
      e = mean_pool(model.apply(params, jnp.where(drop, mask_id, x), attention_mask=m), m)
      views.append(e.astype(jnp.float32))
    logits = views[0] @ views[1].T / temperature
    labels = jnp.arange(x.shape[0])
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1).sum()
    return loss, (jnp.asarray(x.shape[0], jnp.float32), {})
  return objective


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  steps = 2 if FLAGS.small else FLAGS.steps
  batch_size = 8 if FLAGS.small else FLAGS.batch_size
  teacher, tparams, tok, held, data = common.minilm_sentences(FLAGS.seed, heldout=FLAGS.heldout, max_len=FLAGS.max_len,
                                                              batch_size=batch_size, small=FLAGS.small)

  layers = [int(i) for i in FLAGS.layers] or None
  student, sparams, layer_map = students.select_layers(teacher, tparams, layers)
  heads = teacher.config.num_heads
  cfg = distillation.DistillConfig(output='embedding', alpha=1.0, layer_map=layer_map[1:-1],
                                   hidden_weight=FLAGS.hidden_weight, relation_weight=FLAGS.relation_weight,
                                   relation_heads=heads)
  kd = distillation.distillation(student, teacher, cfg)
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=FLAGS.learning_rate,
                                                   warmup_steps=max(steps // 10, 1), total_steps=steps))

  def train(name, params, objective, frozen=None):
    lc = loop.LoopConfig(steps=steps, batch_size=batch_size, run_dir=str(out / 'runs' / name), seed=FLAGS.seed,
                         checkpoint_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False,
                         resume=False, log_every=max(steps // 5, 1))
    t0 = time.perf_counter()
    r = loop.fit(lc, model=student, params=params, objective=objective, optimizer=opt, data=data, frozen=frozen)
    return r.state.params, time.perf_counter() - t0

  embed_t = jax.jit(lambda p, x, m: teacher.sentence_embedding(p, x, m))
  embed_s = jax.jit(lambda p, x, m: student.sentence_embedding(p, x, m))
  t_emb = np.asarray(embed_t(tparams, *held), np.float64)
  rows = []

  def add(name, params, seconds=None):
    s_emb = np.asarray(embed_s(params, *held), np.float64)
    rows.append({'row': name, **fidelity(t_emb, s_emb), 'train_s': seconds})
    print(f"{name:24s} cosine {rows[-1]['cosine']:.4f}  nn agreement {rows[-1]['nn_agreement']:.3f}", flush=True)

  add('layers, untrained', sparams)
  p, s = train('contrastive', sparams, contrastive(student, tok.mask_token_id))
  add('layers + contrastive', p, s)
  rand = student.init(loop.rng_stream(FLAGS.seed, 'init'))
  rand = {**rand, 'embed': sparams['embed']}  # same embeddings: only the blocks start from scratch
  p, s = train('random_kd', rand, kd, frozen=tparams)
  add('random + KD', p, s)
  p, s = train('layers_kd', sparams, kd, frozen=tparams)
  add('layers + KD', p, s)

  x, m = held
  t_s, s_s, ratio = time_ratio(lambda: embed_t(tparams, x, m), lambda: embed_s(p, x, m), 3 if FLAGS.small else 15)
  speed = {'teacher_s': t_s, 'student_s': s_s, 'speedup': ratio, 'sentences': int(len(x)), 'max_len': FLAGS.max_len}
  table = ('| student | embedding cosine to teacher | nearest-neighbour agreement | train s |\n|---|---|---|---|\n' +
           ''.join(f"| {r['row']} | {r['cosine']:.4f} | {r['nn_agreement']:.3f} | "
                   f"{'' if r['train_s'] is None else round(r['train_s'])} |\n" for r in rows))
  config = {'flags': {k: FLAGS[k].value for k in ('seed', 'steps', 'batch_size', 'max_len', 'heldout',
                                                   'learning_rate', 'layers', 'relation_weight', 'hidden_weight',
                                                   'small')},
            'student_layers': [t - 1 for _, t in layer_map[1:]], 'distill': cfg, 'steps': steps}
  provenance.write_run_dir(out, config=config, results={'rows': rows, 'speed': speed})
  (out / 'table.md').write_text(table)
  print(f'\nteacher: all-MiniLM-L6-v2 (6 layers); student: teacher blocks {config["student_layers"]}; '
        f'{steps} steps x {batch_size} sentences; {len(x)} held-out sentences\n')
  print(table)
  print(f'embedding time for {len(x)} sentences x {FLAGS.max_len} tokens (median, interleaved, shared host): '
        f'teacher {t_s * 1e3:.1f} ms, student {s_s * 1e3:.1f} ms, speed-up {ratio:.2f}x')


if __name__ == '__main__':
  app.run(main)
