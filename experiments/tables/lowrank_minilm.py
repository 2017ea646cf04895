"""all-MiniLM-L6-v2 after low-rank factorization: embedding cosine to the dense model on real sentences, and
nearest-neighbour agreement (the held-out sentences whose nearest neighbour among the held-out set is the same as
under the dense model).

SVD vs FWSVD vs ASVD vs SVD-LLM at 20%, 30% and 50% reduction of the block kernels' parameters, with the same
two allocations as experiments/tables/lowrank_table.py (one greedy parameter budget over all kernels, and a uniform
cut). Sentences are fortunes from `data.corpus.fortunes_documents()`: one set for calibration, a disjoint set
for evaluation. No recovery training: this is the one-shot fidelity of each method.

FWSVD needs a loss; an embedding model has no labels, so its Fisher rows are those of the output model
y ~ N(f(x), I) with labels drawn from the model (`lowrank.output_fisher_loss`): the diagonal of Jᵀ J.

    python experiments/tables/lowrank_minilm.py --output_dir=runs/lowrank_minilm
    python experiments/tables/lowrank_minilm.py --small --output_dir=/tmp/lrm        # a tiny random BERT (smoke)
"""

from __future__ import annotations

import pathlib
import time

from absl import app, flags

from experiments.tables import common

common.define_flags('lowrank_minilm', model=False)
flags.DEFINE_list('reductions', ['0.2', '0.3', '0.5'], 'Fractions of the block kernels\' parameters removed.')
flags.DEFINE_list('methods', ['svd', 'fwsvd', 'asvd', 'svd_llm'], 'Factorization methods.')
flags.DEFINE_integer('calib_sentences', 256, 'Sentences for calibration statistics and Fisher rows.')
flags.DEFINE_integer('eval_sentences', 512, 'Held-out sentences the cosine is measured on.')
flags.DEFINE_integer('max_len', 64, 'Tokens per sentence (padded / truncated).')
flags.DEFINE_integer('batch_size', 32, 'Sentences per batch.')
FLAGS = flags.FLAGS


def sentences(n: int, seed: int) -> list[str]:
  """n fortunes of 40 to 400 characters, whitespace collapsed, in a seeded random order."""
  import numpy as np

  from jaxcompress.data import corpus
  docs = [' '.join(d.split()) for d in corpus.fortunes_documents()]
  docs = [d for d in docs if 40 <= len(d) <= 400]
  order = np.random.RandomState(seed).permutation(len(docs))[:n]
  return [docs[i] for i in order]


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxcompress import calibration, lowrank, models
  from jaxcompress.eval import fidelity
  from jaxcompress.recipes import encoder_runs
  from jaxcompress.train import loop

  n_cal, n_eval, bs = ((8, 16, 8) if FLAGS.small else
                       (FLAGS.calib_sentences, FLAGS.eval_sentences, FLAGS.batch_size))
  if FLAGS.small:
    model = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                          num_heads=4, max_position_embeddings=32))
    params = jax.jit(model.init)(loop.rng_stream(FLAGS.seed, 'init'))
    rs = np.random.RandomState(FLAGS.seed)
    tokens = rs.randint(1, 64, (n_cal + n_eval, 16)).astype(np.int32)
    mask = (np.arange(16)[None] < rs.randint(4, 17, (n_cal + n_eval, 1))).astype(np.int32)
  else:
    model, params, tok = common.minilm()
    tokens, mask = encoder_runs.tokenize(tok, sentences(n_cal + n_eval, FLAGS.seed), FLAGS.max_len)
  batches = lambda lo, hi: [{'tokens': tokens[i:min(i + bs, hi)], 'attention_mask': mask[i:min(i + bs, hi)]}
                            for i in range(lo, hi, bs)]
  calib, held = batches(0, n_cal), batches(n_cal, n_cal + n_eval)
  embed = jax.jit(lambda p, t, m: model.sentence_embedding(p, t, m))

  def embed_all(p):
    return np.concatenate([np.asarray(embed(p, b['tokens'], b['attention_mask'])) for b in held])

  t0 = time.time()
  stats = calibration.calibrate(model, params, calib,
                                calibration.combine(h=calibration.hessian(), m=calibration.abs_mean()))
  keys = jax.random.split(loop.rng_stream(FLAGS.seed, 'fisher'), len(calib))
  dim = embed(params, calib[0]['tokens'], calib[0]['attention_mask']).shape[-1]
  fisher_batches = [{**b, 'noise': jax.random.normal(k, (len(b['tokens']), dim), jnp.float32)}
                    for b, k in zip(calib, keys)]
  fisher = lowrank.fisher_rows(model, params, fisher_batches, loss=lowrank.output_fisher_loss(
      lambda p, b: model.sentence_embedding(p, b['tokens'], b['attention_mask'])))
  print(f'calibration statistics and Fisher rows on {n_cal} sentences: {time.time() - t0:.1f}s')
  ref = embed_all(params)
  sel = model.select(params)
  dense_kernels = sum(a * b for a, b in sel.shapes)
  rows = []
  for red in [float(r) for r in FLAGS.reductions]:
    for method in FLAGS.methods:
      st = {'svd': None, 'fwsvd': fisher}.get(method, stats)
      row = {'method': method, 'reduction': red}
      for name, rule in (('budget', lowrank.RankRule(budget=1 - red)), ('uniform', lowrank.RankRule(keep=1 - red))):
        compressed = lowrank.compress(params, config=lowrank.SVDConfig(method=method, ranks=rule), stats=st)
        ranks = lowrank.ranks_of(compressed)
        kept = sum(ranks[p] * sum(s) if p in ranks else s[0] * s[1] for p, s in zip(sel.paths, sel.shapes))
        got = embed_all(compressed)
        cos = fidelity.embedding_cosine(jnp.asarray(ref), jnp.asarray(got))
        nn = encoder_runs.fidelity(ref, got)['nn_agreement']
        row.update({f'{name}_kept': round(kept / dense_kernels, 3), f'{name}_cos_mean': float(cos.mean),
                    f'{name}_cos_min': float(cos.min), f'{name}_nn': nn})
      rows.append(row)
      print(row, flush=True)
  shown = [{k: f'{v:.4f}' if 'cos' in k else f'{v:.3f}' if k.endswith('_nn') else v for k, v in r.items()}
           for r in rows]
  table = common.markdown(shown, ['method', 'reduction', 'budget_kept', 'budget_cos_mean', 'budget_cos_min',
                          'budget_nn', 'uniform_kept', 'uniform_cos_mean', 'uniform_cos_min', 'uniform_nn'])
  table += (f'\n\nEmbedding cosine (mean / min over {n_eval} held-out fortunes, {FLAGS.max_len} tokens) of the '
            'factorized all-MiniLM-L6-v2 to the dense one; nn: nearest-neighbour agreement with the dense model '
            f'among those sentences (self excluded); calibration on {n_cal} other fortunes. budget: one '
            'parameter budget over all block kernels, greedy by each method\'s weighted spectrum; uniform: every '
            'kernel keeps the same fraction (the same ranks for every method). kept: fraction of the block '
            'kernels\' parameters stored. No recovery training.')
  out = pathlib.Path(FLAGS.output_dir)
  common.write(str(out), {'flags': FLAGS.flag_values_dict()}, rows, table)


if __name__ == '__main__':
  app.run(main)
