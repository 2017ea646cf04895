"""A grid over recipes and settings: one compressed model per point, a merged leaderboard and a Pareto plot.

    python experiments/sweep.py --model=fixture --recipes='gptq(bits={bits}, group_size=128)' \
        --recipes='magnitude(sparsity={sparsity}) > gptq(bits={bits})' --grid='{"bits": [3, 4], "sparsity": [0.3]}'
    python experiments/sweep.py --sweep=sweep.json      # {"recipes": [...], "grid": {...}} (flags override)

Resumable: each finished point is written atomically to output_dir/points/<id>.json and skipped on a rerun
with the same id. The id hashes everything the point's result depends on (`point_config`): the model and the
data (named, or files and directories by their content), the recipe, sample counts, seq_len, batch_size, seed,
--measure and --timing_reps, and the versions of jaxcompress, jax and jaxlib. The git revision is recorded in each
point, not hashed: a rerun after a code edit that changes no version reuses the points (and says at which revision
they were computed); delete points/ or give another --output_dir to recompute them. A stored point whose recorded
settings differ from the point's is computed again, never mixed in. Writes leaderboard.md, leaderboard.json and
pareto.png (size on disk against quality, the Pareto front joined) over the points of this sweep only.
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

from experiments import cli

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
flags.DEFINE_string('output_dir', 'runs/sweep', 'Where points/, runs/ and the leaderboard go.')
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
    if not isinstance(t, str):
      raise ValueError(f'recipe template {t!r} is a {type(t).__name__}; write each template as a string.')
    fields = sorted({f for _, f, _, _ in _fields(t) if f})
    missing = [f for f in fields if f not in grid]
    if missing:
      raise ValueError(f'recipe template {t!r} uses {missing}, which --grid does not give (it has {sorted(grid)}).')
    for values in itertools.product(*(grid[f] for f in fields)):
      setting = dict(zip(fields, values))
      try:
        recipe = t.format(**{k: json.dumps(v) if isinstance(v, str) else v for k, v in setting.items()})
      except (ValueError, IndexError, KeyError, AttributeError) as e:
        raise ValueError(f'recipe template {t!r}: {type(e).__name__}: {e}; {_BRACES}.') from None
      if recipe not in seen:
        seen.add(recipe)
        points.append((recipe, setting))
  return points


_BRACES = 'write each grid setting as {name} and a literal brace as {{ or }}'


def _fields(template: str) -> list:
  """`string.Formatter().parse` of a template, an unbalanced brace refused naming the template."""
  try:
    return list(string.Formatter().parse(template))
  except ValueError as e:
    raise ValueError(f'recipe template {template!r}: {e}; {_BRACES}.') from None


def read_spec(path: str) -> dict:
  """The {"recipes": [...], "grid": {...}} object of a --sweep file; a ValueError naming the flag, the file and
  what is wrong (JSON errors with their line and column)."""
  spec = cli.json_file('--sweep', path)
  if not isinstance(spec, dict):
    raise ValueError(f'--sweep={path!r} holds a JSON {type(spec).__name__}; write an object {{"recipes": '
                     '["template", ...], "grid": {"setting": [values]}}.')
  unknown = sorted(set(spec) - {'recipes', 'grid'})
  if unknown:
    raise ValueError(f'--sweep={path!r}: unknown keys {unknown}; a sweep file holds "recipes" and "grid".')
  recipes = spec.get('recipes', [])
  if not isinstance(recipes, list) or not all(isinstance(r, str) for r in recipes):
    raise ValueError(f'--sweep={path!r}: "recipes" must be a list of recipe template strings, not {recipes!r}.')
  return spec


def sweep_points(recipe_flags, grid_flag: str, sweep_flag: str | None) -> tuple[list[str], dict, list]:
  """(templates, grid, [(recipe, setting)]) from the flags (--recipes, --grid, --sweep) with every recipe
  parsed; a ValueError naming the flag, its value and the fix."""
  from jaxcompress import recipes
  spec = read_spec(sweep_flag) if sweep_flag else {}
  templates = list(recipe_flags or spec.get('recipes') or [])
  if not templates:
    raise ValueError('give --recipes (one or more) or --sweep=file.json with "recipes".')
  if grid_flag != '{}':
    grid, where = cli.json_value('--grid', grid_flag), f'--grid={grid_flag!r}'
  else:
    grid, where = spec.get('grid', {}), f'--sweep={sweep_flag!r} "grid"'
  if not isinstance(grid, dict):
    raise ValueError(f'{where} is a JSON {type(grid).__name__}; write an object {{"setting": [values], ...}}.')
  bad = sorted(k for k, v in grid.items() if not isinstance(v, list) or not v)
  if bad:
    raise ValueError(f'{where}: the settings {bad} need a non-empty list of values each, e.g. {{"bits": [3, 4]}}.')
  points = expand(templates, grid)
  for recipe, _ in points:  # every point is checked before any work
    try:
      recipes.parse(recipe)
    except ValueError as e:
      raise ValueError(f'--recipes point {recipe!r}: {str(e).removeprefix("recipe: ")}') from None
  return templates, grid, points


# the flags a point's result depends on (with the recipe, the inputs' content and the code's versions)
RESULT_FLAGS = ('model', 'calib_data', 'eval_data', 'calib_samples', 'eval_samples', 'seq_len', 'batch_size', 'seed',
                'measure', 'timing_reps')
CODE = ('jaxcompress', 'jax', 'jaxlib')  # versions hashed into every point's id
LEADERBOARD = ('leaderboard.md', 'leaderboard.json', 'pareto.png')
_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones by size and first and last MiB


def point_config(settings: dict, recipe: str, inputs: dict, code: dict) -> dict:
  """What a point's result depends on, as stored in its file and hashed into its id: the RESULT_FLAGS
  `settings`, the recipe, `inputs` ({flag: content digest} of the paths among model / calib_data / eval_data)
  and `code` ({package: version})."""
  return json.loads(json.dumps({**{k: settings[k] for k in RESULT_FLAGS}, 'recipe': recipe, 'inputs': inputs,
                                'code': code}))


def point_id(config: dict) -> str:
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def input_digests(settings: dict, named: tuple[str, ...] = ('minilm', 'fixture', 'tiny')) -> dict[str, str]:
  """{flag: `path_digest`} of the model, calib_data and eval_data settings that name a file or directory (not a
  named model or 'default', whose content the code's version fixes)."""
  return {k: path_digest(settings[k]) for k in ('model', 'calib_data', 'eval_data')
          if settings[k] not in (*named, 'default') and pathlib.Path(settings[k]).exists()}


def path_digest(path: str | os.PathLike) -> str:
  """sha256 over a file, or over every file of a directory (relative name, size and bytes; a file over 64 MiB
  by its size and first and last MiB, so a large checkpoint is not read whole)."""
  root = pathlib.Path(path)
  files = sorted(f for f in root.rglob('*') if f.is_file()) if root.is_dir() else [root]
  h = hashlib.sha256()
  for f in files:
    size = f.stat().st_size
    h.update(f'{f.relative_to(root) if root.is_dir() else ""}:{size}\n'.encode())
    with open(f, 'rb') as r:
      if size <= _WHOLE:
        while chunk := r.read(1 << 22):
          h.update(chunk)
      else:
        h.update(r.read(1 << 20))
        r.seek(size - (1 << 20))
        h.update(r.read(1 << 20))
  return h.hexdigest()


def stored_point(file: pathlib.Path, config: dict) -> dict | None:
  """The finished point in `file` if it was computed with `config`; None if absent, unreadable or computed with
  other settings (then the point is computed again and the file replaced)."""
  try:
    point = json.loads(file.read_text())
  except (OSError, ValueError):
    return None
  return point if isinstance(point, dict) and point.get('config') == config and 'result' in point else None


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
  from jaxcompress.recipes import pipeline, run_dir
  from jaxcompress.recipes import setup as setup_lib
  try:
    registry.load_plugins(getattr(FLAGS, 'import'))
  except ImportError as e:
    raise app.UsageError(f'--import: {e}') from None
  from jaxcompress.recipes import preflight
  try:
    templates, grid, points = sweep_points(FLAGS.recipes, FLAGS.grid, FLAGS.sweep)
    model = preflight.check_model(FLAGS.model, calib_data=FLAGS.calib_data, eval_data=FLAGS.eval_data,
                                  seed=FLAGS.seed)
    for recipe, _ in points:  # every point against the model's shapes, before anything is written
      try:
        preflight.check_stages(model, recipes.parse(recipe))
      except preflight.PreflightError as e:
        raise ValueError(f'--recipes point {recipe!r}: {str(e).removeprefix("recipe: ")}') from None
  except ValueError as e:
    raise app.UsageError(cli.as_flag(str(e))) from None
  out = pathlib.Path(FLAGS.output_dir)
  if (out / 'results.json').is_file() or (out / 'compressed.jxc').is_file():
    raise app.UsageError(f'--output_dir={FLAGS.output_dir!r} holds a compress.py run (results.json), not a sweep; '
                         'give the sweep a directory of its own.')
  base = {k: FLAGS[k].value for k in RESULT_FLAGS}
  inputs, versions = input_digests(base), provenance.versions()
  code = {k: versions.get(k) for k in CODE}
  config = {**base, 'recipes': list(templates), 'grid': grid, 'inputs': inputs, 'code': code}
  if run_dir.read_config(out) not in (None, json.loads(json.dumps(config))):  # another sweep's leaderboard
    for name in LEADERBOARD:
      (out / name).unlink(missing_ok=True)
  (out / 'points').mkdir(parents=True, exist_ok=True)
  provenance.write_run_dir(out, config=config)
  revision = provenance.git_revision()
  setup, done, ran = None, [], 0
  for recipe, setting in points:
    cfg = point_config(base, recipe, inputs, code)
    pid = point_id(cfg)
    file = out / 'points' / f'{pid}.json'
    point = stored_point(file, cfg)
    if point is not None:
      at = point.get('revision')
      print(f'skip (done{"" if at == revision else f", computed at revision {at}"}): {recipe}')
      done.append(point)
      continue
    if file.exists():
      print(f'recompute (its stored point has other settings or is unreadable): {recipe}')
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
                            **settings).to_json()
    point = {'id': pid, 'recipe': recipe, 'setting': setting, 'config': cfg, 'revision': revision, 'result': res}
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
  """The `jaxcompress-sweep` command (an error it can name before any work: one line, exit status 2)."""
  cli.run(main)


if __name__ == '__main__':
  console()
