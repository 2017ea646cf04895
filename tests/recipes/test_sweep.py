"""A sweep stopped part way resumes: finished points are skipped, the leaderboard merges every point."""

import json
import subprocess
import sys

import pytest

from tests.train import pretrain_runs as runs

SCRIPT = runs.ROOT / 'experiments' / 'sweep.py'


def sweep(out, *flags):
  proc = subprocess.run([sys.executable, str(SCRIPT), '--model=tiny', f'--output_dir={out}', '--measure=false',
                         '--calib_samples=16', '--eval_samples=8', '--recipes=rtn(bits={bits}, group_size=16)',
                         '--recipes=magnitude(sparsity=0.5) > rtn(bits={bits}, group_size=16)',
                         '--grid={"bits": [4, 8]}', *flags],
                        env=runs.env(1), capture_output=True, text=True, timeout=900, cwd=runs.ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
@pytest.mark.subprocess
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
