"""Metrics files read back by TensorBoard's own loader (tensorboard is a test dependency: never skipped)."""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxcompress.train import metrics as M

REPO = Path(__file__).resolve().parents[2]


def event_files(run_dir: Path) -> list[Path]:
  return sorted((run_dir / 'tb').glob('events.out.tfevents.*'))


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
  acc = EventAccumulator(str(run_dir / 'tb'), size_guidance={'scalars': 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


# MetricsWriter ------------------------------------------------------------------------------------------------


def fake_clock(start: float = 1_700_000_000.0, dt: float = 0.5):
  t = [start - dt]

  def clock():
    t[0] += dt
    return t[0]
  return clock


def test_jsonl_and_events_round_trip(tmp_path):
  steps = range(5)
  with M.MetricsWriter(tmp_path, clock=fake_clock()) as w:
    for s in steps:
      w.write(s, {'loss': jnp.asarray(2.0 / (s + 1)), 'lr': np.float32(1e-3 * s), 'finite': 1})
    w.write(4, {'loss': 0.25}, prefix='eval')
  records = M.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == [0, 1, 2, 3, 4, 4]
  assert all(isinstance(r['time'], float) and r['time'] >= 1_700_000_000 for r in records)
  assert records[2]['loss'] == pytest.approx(2.0 / 3) and records[3]['lr'] == pytest.approx(3e-3)
  assert records[-1] == {'step': 4, 'time': records[-1]['time'], 'eval/loss': 0.25}

  assert len(event_files(tmp_path)) == 1
  tb = tensorboard_scalars(tmp_path)
  assert sorted(tb) == ['eval/loss', 'finite', 'loss', 'lr']
  assert [s for s, _ in tb['loss']] == list(steps)
  np.testing.assert_allclose([v for _, v in tb['loss']], [2.0 / (s + 1) for s in steps], rtol=1e-6)
  np.testing.assert_allclose([v for _, v in tb['lr']], [1e-3 * s for s in steps], rtol=1e-6)
  assert tb['eval/loss'] == [(4, 0.25)]


def test_non_finite_values_survive(tmp_path):
  with M.MetricsWriter(tmp_path) as w:
    w.write(0, {'nan': float('nan'), 'inf': np.inf, 'huge': 1e300})
  (record,) = M.read_jsonl(tmp_path / 'metrics.jsonl')
  assert math.isnan(record['nan']) and record['inf'] == math.inf and record['huge'] == 1e300
  values = {tag: v for tag, ((_, v),) in tensorboard_scalars(tmp_path).items()}
  assert math.isnan(values['nan']) and values['inf'] == math.inf and values['huge'] == math.inf  # float32


def test_prefix_with_or_without_slash():
  assert M.scalars({'loss': 1}, 'train/') == M.scalars({'loss': 1}, 'train') == {'train/loss': 1.0}
  assert M.scalars({'loss': 1}) == {'loss': 1.0}


def test_disabled_writer_makes_no_files(tmp_path):
  run = tmp_path / 'run'
  with M.MetricsWriter(run, enabled=False, resume_step=3) as w:
    w.write(0, {'loss': 1.0})
  assert not run.exists()


def test_bad_values_are_named(tmp_path):
  with M.MetricsWriter(tmp_path) as w:
    with pytest.raises(ValueError, match="'loss'.*not a scalar"):
      w.write(0, {'loss': np.ones(3)})
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.write(0, {'step': 1.0})
    with pytest.raises(ValueError, match='step=-1'):
      w.write(-1, {'loss': 1.0})
  with pytest.raises(ValueError, match='after close'):
    w.write(0, {'loss': 1.0})
  with pytest.raises(ValueError, match='resume_step=-2'):
    M.MetricsWriter(tmp_path, resume_step=-2)


def test_resume_drops_later_steps(tmp_path):
  with M.MetricsWriter(tmp_path, clock=fake_clock()) as w:
    for s in range(10):
      w.write(s, {'loss': float(s)})
  # Resumed from the checkpoint of step 5 in the same second: steps 6.. are written again.
  with M.MetricsWriter(tmp_path, resume_step=5, clock=fake_clock()) as w:
    for s in range(6, 10):
      w.write(s, {'loss': 100.0 + s})
  expected = [(s, float(s) if s <= 5 else 100.0 + s) for s in range(10)]
  assert [(r['step'], r['loss']) for r in M.read_jsonl(tmp_path / 'metrics.jsonl')] == expected
  assert not [p for p in tmp_path.iterdir() if p.name.endswith('.tmp')]  # the trimmed copy was renamed in
  files = event_files(tmp_path)
  assert len(files) == 2 and files[1].name > files[0].name  # replayed in name order
  assert tensorboard_scalars(tmp_path)['loss'] == expected


def test_truncated_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  with M.MetricsWriter(tmp_path) as w:
    for s in range(3):
      w.write(s, {'loss': 1.0})
  with open(path, 'a') as f:
    f.write('{"step": 3, "time": 1.0, "lo')  # killed mid-write
  assert [r['step'] for r in M.read_jsonl(path)] == [0, 1, 2]
  with M.MetricsWriter(tmp_path) as w:  # appending repairs the cut-short line first
    w.write(3, {'loss': 2.0})
  assert [r['step'] for r in M.read_jsonl(path)] == [0, 1, 2, 3]
  with open(path, 'a') as f:
    f.write('{"step": 4, "time": 1.0}')  # whole record, newline never written: kept
  assert [r['step'] for r in M.read_jsonl(path)] == [0, 1, 2, 3, 4]


def test_corrupt_middle_line_is_an_error(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
  with pytest.raises(ValueError, match='line 2 is not valid JSON'):
    M.read_jsonl(path)


def test_latest_by_step():
  records = [{'step': 2, 'loss': 1.0}, {'step': 1, 'loss': 2.0}, {'time': 3.0}, {'step': 2, 'loss': 0.5}]
  assert M.latest_by_step(records) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 0.5}]
  merged = M.latest_by_step(records + [{'step': 2, 'valid/loss': 0.7}])
  assert merged[-1] == {'step': 2, 'loss': 0.5, 'valid/loss': 0.7}


@pytest.mark.subprocess
def test_sigkill_leaves_every_record_readable(tmp_path):
  script = textwrap.dedent(f"""
      import sys, time
      from jaxcompress.train.metrics import MetricsWriter
      w = MetricsWriter({str(tmp_path)!r})
      for s in range(50):
        w.write(s, {{'loss': s / 10}})
      print('written', flush=True)
      time.sleep(60)
  """)
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  proc = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, env=env, text=True)
  try:
    assert proc.stdout.readline().strip() == 'written'
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
  assert proc.returncode == -signal.SIGKILL
  assert [r['step'] for r in M.read_jsonl(tmp_path / 'metrics.jsonl')] == list(range(50))
  assert [s for s, _ in tensorboard_scalars(tmp_path)['loss']] == list(range(50))


# Progress -----------------------------------------------------------------------------------------------------


def test_progress_shows_steps_tokens_and_the_chosen_metrics():
  out = io.StringIO()
  with M.Progress(10, stream=out, every_seconds=0.0) as p:
    for step in range(1, 11):
      p.update(step, tokens=512 * step, metrics={'finite': 1.0, 'lr': 1e-4, 'loss': 3.14159})
  last = out.getvalue().replace('\r', '\n').strip().splitlines()[-1]
  assert '10/10' in last and '100%' in last and 'tok/s=' in last
  assert last.rstrip().endswith('loss=3.142, lr=0.0001]')  # the chosen keys, in their order; not 'finite'


def test_progress_resumed_run_starts_at_its_step():
  out = io.StringIO()
  with M.Progress(40, stream=out, every_seconds=0.0, initial=30) as p:
    p.update(31, tokens=10, metrics={'loss': 1.0})
  assert '31/40' in out.getvalue()


def test_progress_keys_none_shows_first_metrics():
  p = M.Progress(10, enabled=False, keys=None, max_metrics=2)
  assert p.postfix(5.0, {'a': 1.0, 'b': 2.0, 'c': 3.0}) == {'tok/s': '5', 'a': '1', 'b': '2'}


def test_progress_disabled_is_silent():
  out = io.StringIO()
  p = M.Progress(10, enabled=False, stream=out)
  p.update(1, tokens=5, metrics={'loss': 1.0})
  p.close()
  assert out.getvalue() == ''


def test_formatting():
  assert M.format_count(1234.0) == '1.23k' and M.format_count(2.5e6) == '2.5M' and M.format_count(12) == '12'
  assert M.format_count(math.nan) == '-'
