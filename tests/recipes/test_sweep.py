"""A sweep stopped part way resumes: finished points are skipped, the leaderboard merges every point."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
from absl import app

from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'experiments' / 'sweep.py'


def in_process(*argv: str) -> str:
  """sweep.py's main run in this process on the command line `argv` (its flags parsed as the script parses them):
  what it prints. Points then share this process's compiled programs instead of each starting Python and jax."""
  from experiments import sweep as sweep_lib
  flag_values = sweep_lib.FLAGS
  flag_values.unparse_flags()  # every call starts from the defaults, as a new process would
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      sweep_lib.main(flag_values([str(SCRIPT), *argv]))
  finally:
    flag_values.unparse_flags()
  return out.getvalue()


SWEEP = ('--model=tiny', '--measure=false', '--calib_samples=16', '--eval_samples=8',
         '--recipes=rtn(bits={bits}, group_size=16)',
         '--recipes=magnitude(sparsity=0.5) > rtn(bits={bits}, group_size=16)', '--grid={"bits": [4, 8]}')


def sweep(out, *flags):
  return in_process(f'--output_dir={out}', *SWEEP, *flags)


@pytest.mark.slow
def test_a_partial_sweep_resumes_skipping_finished_points(tmp_path):
  first = sweep(tmp_path, '--max_points=3')
  assert first.count('done in') == 3 and 'stopping after 3 new points' in first
  points = sorted((tmp_path / 'points').glob('*.json'))
  assert len(points) == 3
  before = {p.name: p.read_text() for p in points}
  second = sweep(tmp_path)
  assert second.count('skip (done)') == 3 and second.count('done in') == 1
  for name, text in before.items():  # finished points were not rewritten
    assert (tmp_path / 'points' / name).read_text() == text
  board = json.loads((tmp_path / 'leaderboard.json').read_text())
  assert len(board['rows']) == 4 and board['quality'] == 'perplexity'
  assert {r['bits'] for r in board['rows']} == {4, 8}
  ppl = sorted(r['perplexity'] for r in board['rows'])
  assert board['rows'][0]['perplexity'] == ppl[0]  # sorted best first
  front = [r for r in board['rows'] if r['pareto']]
  assert front and all(r['disk_MiB'] > 0 for r in front)
  assert (tmp_path / 'pareto.png').stat().st_size > 1000 and '| recipe | bits |' in (tmp_path / 'leaderboard.md').read_text()


@pytest.mark.subprocess
def test_bad_templates_fail_before_any_point_runs(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), '--model=tiny', f'--output_dir={tmp_path}',
                         '--recipes=rtn(bits={bits})', '--grid={"bits": [4, 12]}'],
                        env=runs.env(1), capture_output=True, text=True, timeout=120, cwd=runs.ROOT)
  assert proc.returncode != 0 and 'bits=12 is outside [2, 8]' in proc.stderr
  assert not (tmp_path / 'points').exists()


@pytest.mark.subprocess
@pytest.mark.parametrize('grid, needle', [('{"bits": []}', 'non-empty list'), ('{}', "uses ['bits']")])
def test_grid_errors_name_the_problem(grid, needle):
  from experiments import sweep as sweep_lib
  with pytest.raises(ValueError, match=needle.replace('[', r'\[').replace(']', r'\]')):
    sweep_lib.expand(['rtn(bits={bits})'], json.loads(grid))


BASE = dict(model='tiny', calib_data='default', eval_data='default', calib_samples=16, eval_samples=8, seq_len=16,
            batch_size=8, seed=0, measure=False, timing_reps=5)
CODE = {'jaxcompress': '0.1.0', 'jax': '0.4', 'jaxlib': '0.4'}


def test_a_point_id_covers_every_setting_its_result_depends_on(tmp_path):
  from experiments import sweep as sweep_lib
  config = lambda inputs={}, code=CODE, **kw: sweep_lib.point_config({**BASE, **kw}, 'rtn(bits=4)', inputs, code)
  ref = sweep_lib.point_id(config())
  assert sweep_lib.point_id(config()) == ref and len(ref) == 16
  for key, value in (('calib_samples', 32), ('eval_samples', 16), ('seq_len', 32), ('batch_size', 4), ('seed', 1),
                     ('measure', True), ('timing_reps', 1), ('calib_data', 'c.txt'), ('eval_data', 'e.txt'),
                     ('model', 'fixture')):
    assert sweep_lib.point_id(config(**{key: value})) != ref, key
  assert sweep_lib.point_id(config(code={**CODE, 'jax': '0.5'})) != ref
  assert sweep_lib.point_id(config(inputs={'calib_data': 'ab'})) != ref
  # files and directories named by the settings count by their content; named models and 'default' by name
  data, model = tmp_path / 'calib.txt', tmp_path / 'ckpt'
  data.write_text('one\ntwo\n')
  model.mkdir()
  (model / 'config.json').write_text('{}')
  settings = {**BASE, 'calib_data': str(data), 'model': str(model)}
  first = sweep_lib.input_digests(settings)
  assert sorted(first) == ['calib_data', 'model'] and sweep_lib.input_digests(BASE) == {}
  data.write_text('one\nthree\n')
  (model / 'config.json').write_text('{"a": 1}')
  second = sweep_lib.input_digests(settings)
  assert second['calib_data'] != first['calib_data'] and second['model'] != first['model']


def test_a_stored_point_of_other_settings_is_not_reused(tmp_path):
  from experiments import sweep as sweep_lib
  config = sweep_lib.point_config(BASE, 'rtn(bits=4)', {}, CODE)
  file = tmp_path / 'p.json'
  assert sweep_lib.stored_point(file, config) is None  # absent
  file.write_text(json.dumps({'recipe': 'rtn(bits=4)', 'result': {}}))  # written before points kept their settings
  assert sweep_lib.stored_point(file, config) is None
  file.write_text(json.dumps({'config': {**config, 'calib_samples': 512}, 'result': {}}))
  assert sweep_lib.stored_point(file, config) is None
  file.write_text('{"config": ')  # unreadable
  assert sweep_lib.stored_point(file, config) is None
  file.write_text(json.dumps({'config': config, 'result': {'x': 1}}))
  assert sweep_lib.stored_point(file, config)['result'] == {'x': 1}


@pytest.mark.slow
def test_a_rerun_with_other_sample_counts_recomputes_its_points(tmp_path):
  def one(*flags, out=tmp_path):
    return in_process('--model=tiny', f'--output_dir={out}', '--measure=false', '--eval_samples=8',
                      '--recipes=rtn(bits={bits}, group_size=16)', '--grid={"bits": [8]}', *flags)

  assert one('--calib_samples=16').count('done in') == 1
  assert one('--calib_samples=8').count('done in') == 1  # not skipped as done
  assert one('--calib_samples=8').count('skip (done') == 1
  points = [json.loads(p.read_text()) for p in (tmp_path / 'points').glob('*.json')]
  assert sorted(p['config']['calib_samples'] for p in points) == [8, 16]
  board = json.loads((tmp_path / 'leaderboard.json').read_text())
  assert json.loads((tmp_path / 'config.json').read_text())['calib_samples'] == 8 and len(board['rows']) == 1
  new = next(p for p in points if p['config']['calib_samples'] == 8)
  assert board['rows'][0]['perplexity'] == new['result']['quality']['perplexity']
  # a compress.py run directory is not a sweep's: refused, left as it was
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'results.json').write_text('{}')
  with pytest.raises(app.UsageError, match=r'holds a compress.py run \(results.json\), not a sweep'):
    one(out=tmp_path / 'run')
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['results.json']
