"""Perplexity of the pretrained causal-LM fixture pruned one-shot: dense vs magnitude / Wanda / SparseGPT / OWL / RIA at
50% unstructured, 2:4, 4:8 and 70%, on held-out rows the fixture never saw.

    python experiments/tables/prune_table.py                          # the committed fixture
    python experiments/tables/prune_table.py --model=/work/fixture/hf # a checkpoint directory with its training.json
    python experiments/tables/prune_table.py --small                  # a tiny random Llama, seconds (smoke test)

Calibration: `--calib_rows` rows of `--calib_len` tokens drawn (seeded) from the fixture's training rows.
Every kernel of every block is pruned (embeddings and lm_head stay dense, as in both papers). Magnitude compares
each whole kernel (the papers' layer-wise baseline); Wanda compares the inputs of each output; SparseGPT selects
adaptively per block of 128 input rows and reconstructs the kept weights, block by block, true-sequentially.
OWL is Wanda with outlier-weighed block sparsities (M=5, λ=0.08); it has no N:M rows (N:M fixes every layer's).
RIA scores each weight relative to its output's and its input's weights, times ‖X_j‖₂^0.5, compared as Wanda's.

    python experiments/tables/prune_table.py --methods=wanda,owl --settings=50%,70%   # only the OWL rows and Wanda's
Writes config.json, environment.json, results.json and table.md into --output_dir.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax
import numpy as np
from absl import app, flags

from jaxcompress import calibration, models, provenance, pruning
from jaxcompress.eval import lm

flags.DEFINE_string('model', 'fixture', "'fixture' or a checkpoint directory (holding training.json too).")
flags.DEFINE_string('output_dir', 'runs/prune_table', 'Where the JSON and markdown table go.')
flags.DEFINE_integer('seed', 0, 'Seed of the calibration rows drawn from the training rows.')
flags.DEFINE_integer('calib_rows', 128, 'Calibration rows.')
flags.DEFINE_integer('calib_len', 128, 'Tokens per calibration row.')
flags.DEFINE_integer('eval_rows', 0, 'Held-out rows scored (0: all).')
flags.DEFINE_list('settings', ['50%', '2:4', '4:8', '70%'], 'Sparsity settings: a percentage or N:M.')
flags.DEFINE_list('methods', ['magnitude', 'wanda', 'sparsegpt', 'owl', 'ria'], 'Pruning methods.')
flags.DEFINE_bool('small', False, 'A tiny random Llama on random tokens (smoke mode).')
FLAGS = flags.FLAGS

BATCH = 16  # rows per calibration / evaluation batch


def load():
  """(model, params, calibration rows [R, L] int32, held-out rows [N, T + 1] int32)."""
  rs = np.random.RandomState(FLAGS.seed)
  if FLAGS.small:
    model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    params = model.init(jax.random.key(FLAGS.seed))
    return model, params, rs.randint(0, 64, (16, 16)).astype(np.int32), rs.randint(0, 64, (16, 17)).astype(np.int32)
  from jaxcompress.recipes import fixture
  model, params = fixture.load(FLAGS.model)
  data_dir = fixture.FIXTURE_DIR if FLAGS.model == 'fixture' else fixture.resolve(FLAGS.model)
  _, train, valid = fixture.data(data_dir)
  rows = train.sequences[rs.permutation(train.num_sequences)[:FLAGS.calib_rows], :FLAGS.calib_len]
  valid = valid[:FLAGS.eval_rows] if FLAGS.eval_rows else valid
  return model, params, rows.astype(np.int32), valid.astype(np.int32)


def held_out_ppl(model, params, valid) -> float:
  return lm.rows_perplexity(model, params, valid, batch_size=BATCH).perplexity


def outlier_ratio(model, params, calib) -> dict[str, float]:
  """How uneven the input features of each kernel are: max_j ‖X_j‖ / median_j ‖X_j‖ (Wanda's gain over magnitude
  comes from a few input features far larger than the rest, which large LLMs have and small models may lack)."""
  batches = [calib[lo:lo + BATCH] for lo in range(0, len(calib), BATCH)]
  stats = calibration.calibrate(model, params, batches, calibration.column_norms(), head=False)
  out = {}
  for path, s in stats.items():
    n = np.asarray(calibration.norms(s))
    out[path] = float(n.max() / np.median(n))
  return out


def prune(method: str, setting: str, model, params, calib):
  pattern, sparsity = (setting, 0.5) if ':' in setting else (None, float(setting.rstrip('%')) / 100)
  batches = [calib[lo:lo + BATCH] for lo in range(0, len(calib), BATCH)]
  if method == 'magnitude':
    return pruning.magnitude(model, params, config=pruning.MagnitudeConfig(sparsity=sparsity, pattern=pattern))[1]
  if method == 'wanda':
    return pruning.wanda(model, params, batches, config=pruning.WandaConfig(sparsity=sparsity, pattern=pattern))[1]
  if method == 'sparsegpt':
    return pruning.sparsegpt(model, params, batches,
                             config=pruning.SparseGPTConfig(sparsity=sparsity, pattern=pattern))[1]
  if method == 'owl':
    if pattern is not None:
      return None  # OWL sets per-block sparsities, N:M fixes every layer's: no such row
    return pruning.owl(model, params, batches, config=pruning.WandaConfig(sparsity=sparsity, distribution='owl'))[1]
  if method == 'ria':
    return pruning.ria(model, params, batches, config=pruning.RIAConfig(sparsity=sparsity, pattern=pattern))[1]
  raise ValueError(f'--methods: unknown method {method!r}; use magnitude, wanda, sparsegpt, owl, ria.')


def main(argv):
  del argv
  model, params, calib, valid = load()
  results = {'dense': held_out_ppl(model, params, valid), 'rows': {}, 'seconds': {}, 'sparsity': {}}
  print(f'dense: {results["dense"]:.2f}  (calibration {calib.shape}, held-out {valid.shape})', flush=True)
  ratios = outlier_ratio(model, params, calib)
  results['outlier_ratio'] = ratios
  print('input-feature outliers, max/median ‖X_j‖ per kernel: median over kernels '
        f'{np.median(list(ratios.values())):.1f}, max {max(ratios.values()):.1f}', flush=True)
  for setting in FLAGS.settings:
    for method in FLAGS.methods:
      t0 = time.perf_counter()
      pruned = prune(method, setting, model, params, calib)
      secs = time.perf_counter() - t0
      if pruned is None:
        continue
      ppl = held_out_ppl(model, pruned, valid)
      key = f'{method}/{setting}'
      results['rows'][key] = ppl
      results['seconds'][key] = secs
      results['sparsity'][key] = pruning.sparsity_of(pruned, model.select(pruned))
      print(f'{key:<20} ppl {ppl:10.2f}  sparsity {results["sparsity"][key]:.3f}  {secs:.1f}s', flush=True)
  lines = [f'Held-out perplexity ({len(valid)} rows; dense {results["dense"]:.2f}); calibration '
           f'{calib.shape[0]} x {calib.shape[1]} tokens, seed {FLAGS.seed}; input-feature outliers max/median '
           f'‖X_j‖: median over kernels {np.median(list(ratios.values())):.1f}, max {max(ratios.values()):.1f}', '',
           '| setting | ' + ' | '.join(FLAGS.methods) + ' |', '|---|' + '---:|' * len(FLAGS.methods)]
  for setting in FLAGS.settings:
    cells = [results['rows'].get(f'{m}/{setting}') for m in FLAGS.methods]
    lines.append(f'| {setting} | ' + ' | '.join('—' if c is None else f'{c:.2f}' for c in cells) + ' |')
  table = '\n'.join(lines)
  print(table)
  config = {k: FLAGS[k].value for k in ('model', 'seed', 'calib_rows', 'calib_len', 'eval_rows', 'settings',
                                        'methods', 'small')}
  out = provenance.write_run_dir(FLAGS.output_dir, config=config, results=results)
  (out / 'table.md').write_text(table + '\n')


if __name__ == '__main__':
  app.run(main)
