"""A grid over recipes and settings: one compressed model per point, a merged leaderboard and a Pareto plot.

    python experiments/sweep.py --model=fixture --recipes='gptq(bits={bits}, group_size=128)' \
        --recipes='magnitude(sparsity={sparsity}) > gptq(bits={bits})' --grid='{"bits": [3, 4], "sparsity": [0.3]}'
    python experiments/sweep.py --sweep=sweep.json      # {"recipes": [...], "grid": {...}} (flags override)

Resumable: each finished point is written atomically to output_dir/points/<id>.json and skipped on a rerun
(same model, recipe and seed, same id). Writes leaderboard.md, leaderboard.json and pareto.png (size on disk
against quality, the Pareto front joined).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pathlib
import string
import time

os.environ.setdefault('HF_HUB_OFFLINE', '1')

from absl import app, flags

flags.DEFINE_string('model', 'minilm', "'minilm' (all-MiniLM-L6-v2), 'fixture' (the causal-LM fixture), 'tiny' (a "
                    'random 2-layer Llama, seconds) or a checkpoint directory holding config.json.')
flags.DEFINE_string('calib_data', 'default', "Calibration text: 'default', a .txt file (encoders, one text per line) "
                    'or a .npy of token rows (causal LMs).')
flags.DEFINE_string('eval_data', 'default', "Evaluation text: 'default', a .txt file or a .npy of token rows "
                    '[N, T + 1].')
flags.DEFINE_integer('calib_samples', 512, 'Calibration sequences.', lower_bound=1)
flags.DEFINE_integer('eval_samples', 256, 'Evaluation sequences.', lower_bound=1)
flags.DEFINE_integer('seq_len', 64, 'Tokens per encoder sentence (longer ones are cut).', lower_bound=8)
flags.DEFINE_integer('batch_size', 32, 'Sequences per calibration, evaluation and training batch.', lower_bound=1)
flags.DEFINE_integer('seed', 0, 'The one seed every random choice derives from.')
flags.DEFINE_string('output_dir', 'runs/compress', 'Where points/, runs/ and the leaderboard go.')
flags.DEFINE_bool('measure', True, 'Measure speed, fine-tuning cost and energy of every point (False: size and '
                  'quality only).')
flags.DEFINE_integer('timing_reps', 5, 'Interleaved repetitions of the dense/compressed speed measurements.',
                     lower_bound=1)
flags.DEFINE_list('import', [], 'Python modules imported before the recipes are read (comma-separated): the '
                  'methods they register run in --recipes.')
flags.DEFINE_multi_string('recipes', None, 'Recipe templates; {name} fields are filled from --grid.')
flags.DEFINE_string('grid', '{}', 'JSON object {setting: [values]}; every combination fills every template.')
flags.DEFINE_string('sweep', None, 'JSON file {"recipes": [...], "grid": {...}} (used where the flags are unset).')
flags.DEFINE_integer('max_points', 0, 'Stop after this many newly run points (0: all); a rerun goes on.',
                     lower_bound=0)
FLAGS = flags.FLAGS


def expand(templates: list[str], grid: dict) -> list[tuple[str, dict]]:
  """[(recipe, setting)] for every template and every combination of the grid values it uses (deduplicated)."""
  if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
    raise ValueError(f'grid {grid!r} must map each setting to a non-empty list of values.')
  points, seen = [], set()
  for t in templates:
    fields = sorted({f for _, f, _, _ in string.Formatter().parse(t) if f})
    missing = [f for f in fields if f not in grid]
    if missing:
      raise ValueError(f'recipe template {t!r} uses {missing}, which --grid does not give (it has {sorted(grid)}).')
    for values in itertools.product(*(grid[f] for f in fields)):
      setting = dict(zip(fields, values))
      recipe = t.format(**{k: json.dumps(v) if isinstance(v, str) else v for k, v in setting.items()})
      if recipe not in seen:
        seen.add(recipe)
        points.append((recipe, setting))
  return points


def point_id(model: str, recipe: str, seed: int) -> str:
  return hashlib.sha256(json.dumps([model, recipe, seed]).encode()).hexdigest()[:16]


def row(point: dict, higher: bool, q: str) -> dict:
  r = point['result']
  return {'recipe': point['recipe'], **point['setting'], 'disk_MiB': r['size']['disk_bytes'] / 2**20,
          'compression': r['size']['compression'], 'bits_per_weight': r['size']['bits_per_weight'],
          q: r['quality'][q], 'compress_s': r['compress_s']}


def pareto(rows: list[dict], q: str, higher: bool) -> list[dict]:
  """Rows no other row beats on both size and quality, by increasing size."""
  best, front = None, []
  for r in sorted(rows, key=lambda r: (r['disk_MiB'], -r[q] if higher else r[q])):
    if best is None or (r[q] > best if higher else r[q] < best):
      front.append(r)
      best = r[q]
  return front


def write_leaderboard(out: pathlib.Path, points: list[dict], q: str, higher: bool, dense: float) -> str:
  from jaxcompress import provenance
  rows = sorted((row(p, higher, q) for p in points), key=lambda r: -r[q] if higher else r[q])
  front = {r['recipe'] for r in pareto(rows, q, higher)}
  settings = sorted({k for p in points for k in p['setting']})
  cols = ['recipe', *settings, 'disk_MiB', 'compression', 'bits_per_weight', q, 'compress_s', 'pareto']
  for r in rows:
    r['pareto'] = 'yes' if r['recipe'] in front else ''
  fmt = lambda v: f'{v:.4f}' if isinstance(v, float) else str(v)
  lines = [f'original: {q} {dense:.4f}', '', '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  lines += ['| ' + ' | '.join(fmt(r.get(c, '')) for c in cols) + ' |' for r in rows]
  text = '\n'.join(lines) + '\n'
  provenance.atomic_write(out / 'leaderboard.md', text)
  provenance.write_json(out / 'leaderboard.json', {'quality': q, 'dense': dense, 'rows': rows})
  _plot(out / 'pareto.png', rows, q, higher, dense)
  return text


def _plot(path, rows, q, higher, dense):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ax.scatter([r['disk_MiB'] for r in rows], [r[q] for r in rows], s=18, label='points')
  front = pareto(rows, q, higher)
  ax.plot([r['disk_MiB'] for r in front], [r[q] for r in front], 'r-o', ms=4, label='Pareto front')
  for r in front:
    ax.annotate(r['recipe'][:40], (r['disk_MiB'], r[q]), textcoords='offset points', xytext=(3, 3), fontsize=6)
  ax.axhline(dense, color='gray', ls='--', lw=1, label='original')
  ax.set_xlabel('size on disk (MiB)')
  ax.set_ylabel(q)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; every setting is a --flag (see --help).')
  from jaxcompress import provenance, recipes, registry
  from jaxcompress.recipes import pipeline
  from jaxcompress.recipes import setup as setup_lib
  try:
    registry.load_plugins(getattr(FLAGS, 'import'))
  except ImportError as e:
    raise app.UsageError(f'--import: {e}') from None
  spec = {}
  if FLAGS.sweep:
    path = pathlib.Path(FLAGS.sweep)
    if not path.is_file():
      raise app.UsageError(f'--sweep={FLAGS.sweep!r} is not a file.')
    spec = json.loads(path.read_text())
  templates = FLAGS.recipes or spec.get('recipes')
  if not templates:
    raise app.UsageError('give --recipes (one or more) or --sweep=file.json with "recipes".')
  try:
    grid = json.loads(FLAGS.grid) if FLAGS.grid != '{}' else spec.get('grid', {})
    points = expand(list(templates), grid)
    for recipe, _ in points:  # every point is checked before any work
      recipes.parse(recipe)
  except (ValueError, json.JSONDecodeError) as e:
    raise app.UsageError(str(e)) from None
  out = pathlib.Path(FLAGS.output_dir)
  (out / 'points').mkdir(parents=True, exist_ok=True)
  base = {k: FLAGS[k].value for k in ('model', 'calib_data', 'eval_data', 'calib_samples', 'eval_samples', 'seq_len',
                                      'batch_size', 'seed', 'timing_reps')}
  provenance.write_run_dir(out, config={**base, 'recipes': list(templates), 'grid': grid})
  setup, done, ran = None, [], 0
  for recipe, setting in points:
    pid = point_id(base['model'], recipe, base['seed'])
    file = out / 'points' / f'{pid}.json'
    if file.is_file():
      print(f'skip (done): {recipe}')
      done.append(json.loads(file.read_text()))
      continue
    if FLAGS.max_points and ran >= FLAGS.max_points:
      print(f'stopping after {ran} new points (--max_points); rerun to go on.')
      break
    if setup is None:
      setup = setup_lib.load(base['model'], calib_data=base['calib_data'], eval_data=base['eval_data'],
                             calib_samples=base['calib_samples'], eval_samples=base['eval_samples'],
                             seq_len=base['seq_len'], batch_size=base['batch_size'], seed=base['seed'])
    t0 = time.perf_counter()
    settings = {k: v for k, v in base.items() if k != 'model'}
    res = pipeline.compress(setup, recipe, output_dir=out / 'runs' / pid, save=False, per_stage_eval=False,
                            measure=FLAGS.measure, **settings).to_json()
    point = {'id': pid, 'recipe': recipe, 'setting': setting, 'result': res}
    provenance.atomic_write(file, json.dumps(provenance.to_jsonable(point)))
    done.append(point)
    ran += 1
    print(f'done in {time.perf_counter() - t0:.1f}s: {recipe}')
  if done:
    setup_like = done[0]['result']
    q = 'cosine_mean' if 'cosine_mean' in setup_like['quality'] else 'perplexity'
    text = write_leaderboard(out, done, q, q == 'cosine_mean', setup_like['quality_dense'][q])
    print('\n' + text)
    print(f'files: {out}/leaderboard.md, leaderboard.json, pareto.png')


def console():
  """The `jaxcompress-sweep` command."""
  app.run(main)


if __name__ == '__main__':
  console()
