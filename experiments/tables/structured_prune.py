"""Retraining-free structured pruning (Kwon et al. 2022) of all-MiniLM-L6-v2, or of the causal-LM fixture, to a
FLOPs budget: fidelity against the dense model, the layer-drop baseline, Fisher-only vs + least-squares tuning,
and the measured forward speed-up of the physically smaller model.

    python experiments/tables/structured_prune.py                   # MiniLM at 60% of the blocks' FLOPs
    python experiments/tables/structured_prune.py --model=fixture --budgets=0.6,0.8
    python experiments/tables/structured_prune.py --small           # a smoke test in seconds: MiniLM's path
                                                                    # on a random 2-block BERT (fixture: 2 blocks)

Importance: the diagonal Fisher of head and neuron masks. MiniLM has no labels; its loss is the negative log-
likelihood of y ~ N(e(x), I) with e the normalized sentence embedding and y sampled from that distribution
(--probes samples per sentence), whose Fisher is diag(JᵀJ), J = ∂e/∂mask: the true Fisher of a Gaussian output
model, which ranks units by how much they move the embedding. The fixture's loss is the next-token NLL of the
real text (the empirical Fisher, as Kwon et al. with labels).
Rows: 'Fisher' keeps the searched units as they are; '+ LS' adds the layer-wise least-squares scales (for
MiniLM's post-norm blocks measured through the following LayerNorm, and once more in the plain residual metric
of Kwon et al., 'plain residual'); 'layer drop'
keeps the first k blocks, k the most whose FLOPs fit the budget (and the next k up, over budget).
Speed: dense over pruned forward time, jitted, timed interleaved in one run (the host may be shared).
"""

from __future__ import annotations

import pathlib
import time

from experiments.tables import common

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import provenance
from jaxcompress.data import corpus
from jaxcompress.eval import lm
from jaxcompress.pruning._src import structured  # the module; pruning.structured is the method
from jaxcompress.recipes.encoder_runs import tokenize


flags.DEFINE_enum('model', 'minilm', ['minilm', 'fixture'], 'all-MiniLM-L6-v2 or the causal-LM fixture.')
flags.DEFINE_list('budgets', ['0.6'], "Fractions of the dense blocks' FLOPs to keep.")
common.define_flags('structured_prune', model=False)
flags.DEFINE_integer('calibration', 256, 'Calibration sentences (MiniLM) or rows (fixture).')
flags.DEFINE_integer('heldout', 256, 'Held-out sentences (MiniLM); the fixture uses all its held-out rows.')
flags.DEFINE_integer('max_len', 64, 'Tokens per MiniLM sentence (longer ones are cut).')
flags.DEFINE_integer('batch_size', 16, 'Calibration examples per batch.')
flags.DEFINE_integer('probes', 4, 'Sampled targets per sentence for the MiniLM Fisher.')
flags.DEFINE_float('damping', 1e-4, 'Least-squares damping, relative to the mean diagonal.')
flags.DEFINE_integer('repeats', 15, 'Interleaved timing repeats.')
FLAGS = flags.FLAGS


def embedding_fidelity(ref: np.ndarray, emb: np.ndarray) -> dict:
  """Mean cosine of matching rows, and nearest-neighbour agreement within the set (self excluded)."""
  def nn(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)
  return {'cosine': float(np.mean(np.sum(ref * emb, -1))), 'cosine_min': float(np.min(np.sum(ref * emb, -1))),
          'nn_agreement': float(np.mean(nn(ref) == nn(emb)))}


def batches_of(fields: dict, size: int) -> list[dict]:
  n = len(next(iter(fields.values())))
  return [{k: jnp.asarray(v[i:i + size]) for k, v in fields.items()} for i in range(0, n, size)]


def minilm_setup(seed, n_cal, n_held, max_len):
  model, params, tok = common.minilm()
  docs = corpus.fortunes_documents()
  order = np.random.default_rng(seed).permutation(len(docs))
  held = tokenize(tok, [docs[i] for i in order[:n_held]], max_len)
  cal = tokenize(tok, [docs[i] for i in order[n_held:n_held + n_cal]], max_len)
  return model, params, {'tokens': cal[0], 'attention_mask': cal[1]}, held


def small_bert_setup(seed, n_cal, n_held, max_len):
  """minilm_setup's shapes for --small: a random 2-block BERT on random tokens (no checkpoint to load)."""
  from jaxcompress import models
  from jaxcompress.train import loop
  model = models.Bert(models.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                        num_heads=4, max_position_embeddings=max_len))
  params = jax.jit(model.init)(loop.rng_stream(seed, 'init'))
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, 64, (n_cal + n_held, max_len)).astype(np.int32)
  mask = (np.arange(max_len)[None] < rs.randint(4, max_len + 1, (n_cal + n_held, 1))).astype(np.int32)
  return model, params, {'tokens': tokens[:n_cal], 'attention_mask': mask[:n_cal]}, (tokens[n_cal:], mask[n_cal:])


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.output_dir)
  small = FLAGS.small
  budgets = [float(b) for b in FLAGS.budgets]
  n_cal = 16 if small else FLAGS.calibration
  repeats = 2 if small else FLAGS.repeats
  if FLAGS.model == 'minilm':
    n_held = 24 if small else FLAGS.heldout
    max_len = 16 if small else FLAGS.max_len
    model, params, cal, (held_x, held_m) = (small_bert_setup if small else minilm_setup)(FLAGS.seed, n_cal, n_held,
                                                                                          max_len)
    seq_len = max_len
  else:
    model, params, rows, held_rows = common.fixture_rows('fixture', n_cal, FLAGS.seed, sort=True)
    rows = rows.astype(np.int32)
    cal = {'tokens': rows}
    held_rows = held_rows[:16] if small else held_rows
    seq_len = rows.shape[1] - 1
  if small and FLAGS.model == 'fixture':  # two blocks: every step runs, with fewer shapes to compile
    model, params = structured.drop_layers(model, params, [0, 1])
  loss = (structured.embedding_loss(model, FLAGS.probes) if FLAGS.model == 'minilm'
          else structured.next_token_loss(model))
  cal_batches = batches_of(cal, FLAGS.batch_size)
  tune_batches = [({'tokens': b['tokens'][:, :-1]} if FLAGS.model == 'fixture' else b) for b in cal_batches]

  t0 = time.perf_counter()
  hf, nf = structured.fisher(model, params, cal_batches, loss, key=jax.random.key(FLAGS.seed))
  fisher_s = time.perf_counter() - t0
  units = structured.units(model, params)
  n_layers = len(units.heads)
  head_cost, neuron_cost = structured.unit_flops(model, params, seq_len)
  layer_share = [(head_cost * h + neuron_cost * n) / structured.block_flops(model, params, seq_len)
                 for h, n in zip(units.heads, units.neurons)]

  if FLAGS.model == 'minilm':
    run = jax.jit(lambda m, p, x, msk: m.sentence_embedding(p, x, msk), static_argnums=0)
    dense_emb = np.asarray(run(model, params, held_x, held_m), np.float64)

    def score(m, p):
      return embedding_fidelity(dense_emb, np.asarray(run(m, p, held_x, held_m), np.float64))

    def forward(m, p):
      return lambda: run(m, p, held_x, held_m)
  else:
    def score(m, p):
      return {'perplexity': float(lm.rows_perplexity(m, p, held_rows).perplexity)}

    fwd = jax.jit(lambda m, p, x: m.apply(p, x), static_argnums=0)
    x_time = jnp.asarray(held_rows[:16, :-1])

    def forward(m, p):
      return lambda: fwd(m, p, x_time)

  rows_out = []
  dense_row = {'row': 'dense', 'budget': 1.0, 'flops': 1.0, **score(model, params)}
  rows_out.append(dense_row)
  print(dense_row, flush=True)
  timed = {'dense': forward(model, params)}
  for budget in budgets:
    keep = structured.search(model, params, hf, nf, budget=budget, seq_len=seq_len)
    flops = structured.keep_flops(model, params, keep, seq_len)
    small_model, sliced = structured.slice_units(model, params, keep)
    widths = structured.layer_widths(small_model, sliced)
    rows_out.append({'row': f'Fisher {budget:.0%}', 'budget': budget, 'flops': flops, **score(small_model, sliced),
                     'widths': widths})
    print(rows_out[-1], flush=True)
    t0 = time.perf_counter()
    tuned = structured.tune(model, params, small_model, sliced, tune_batches, damping=FLAGS.damping)
    tune_s = time.perf_counter() - t0
    rows_out.append({'row': f'Fisher + LS {budget:.0%}', 'budget': budget, 'flops': flops,
                     **score(small_model, tuned), 'tune_s': tune_s})
    print(rows_out[-1], flush=True)
    timed[f'Fisher + LS {budget:.0%}'] = forward(small_model, tuned)
    if model.family == 'bert':  # the same least squares in the plain residual metric (no LayerNorm weighting)
      plain = structured.tune(model, params, small_model, sliced, tune_batches, damping=FLAGS.damping,
                              norm_metric=False)
      rows_out.append({'row': f'Fisher + LS, plain residual {budget:.0%}', 'budget': budget, 'flops': flops,
                       **score(small_model, plain)})
      print(rows_out[-1], flush=True)
    cum = np.cumsum(layer_share)
    k_fit = int(np.sum(cum <= budget + 1e-9))
    for k in sorted({max(k_fit, 1)} | ({k_fit + 1} if k_fit + 1 < n_layers else set())):
      drop_model, dropped = structured.drop_layers(model, params, list(range(k)))
      rows_out.append({'row': f'layer drop: first {k} of {n_layers} blocks', 'budget': budget,
                       'flops': float(cum[k - 1]), **score(drop_model, dropped)})
      print(rows_out[-1], flush=True)
      timed.setdefault(f'layer drop {k}', forward(drop_model, dropped))

  med = common.interleaved(timed, repeats)
  speed = {n: {'median_s': t, 'speedup_vs_dense': med['dense'] / t} for n, t in med.items()}
  metric_cols = (('cosine', 'embedding cosine (mean)'), ('cosine_min', 'cosine (min)'),
                 ('nn_agreement', 'nearest-neighbour agreement')) if FLAGS.model == 'minilm' else (
                     ('perplexity', 'held-out perplexity'),)
  head = '| row | FLOPs of blocks | ' + ' | '.join(c[1] for c in metric_cols) + ' | speed-up vs dense |\n'
  head += '|---|---:|' + '---:|' * len(metric_cols) + '---:|\n'

  def speed_of(r):
    name = r['row'] if r['row'] in speed else (f"layer drop {r['row'].split()[3]}" if 'layer drop' in r['row'] else None)
    return f"{speed[name]['speedup_vs_dense']:.2f}x" if name in speed else ''
  table = head + ''.join(
      f"| {r['row']} | {r['flops']:.3f} | " + ' | '.join(f'{r[c]:.4f}' if c != 'perplexity' else f'{r[c]:.2f}'
                                                         for c, _ in metric_cols) + f' | {speed_of(r)} |\n'
      for r in rows_out)
  config = {'flags': {k: FLAGS[k].value for k in ('model', 'budgets', 'seed', 'calibration', 'heldout', 'max_len',
                                                   'batch_size', 'probes', 'damping', 'repeats', 'small')},
            'seq_len_for_flops': seq_len, 'head_flops_per_token': head_cost, 'neuron_flops_per_token': neuron_cost}
  results = {'rows': rows_out, 'speed': speed, 'fisher_s': fisher_s,
             'fisher': {'heads': [h.tolist() for h in hf], 'neurons_sum': [float(n.sum()) for n in nf]}}
  provenance.write_run_dir(out, config=config, results=results)
  (out / 'table.md').write_text(table)
  print(f'\n{FLAGS.model}: Fisher over {n_cal} calibration examples ({fisher_s:.0f} s); FLOPs per token at '
        f'{seq_len} tokens\n')
  print(table)
  print('speed: median forward time, interleaved, on a shared host: ' +
        ', '.join(f"{n} {v['median_s'] * 1e3:.1f} ms" for n, v in speed.items()))


if __name__ == '__main__':
  app.run(main)
