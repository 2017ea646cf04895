"""Killed and pre-empted training runs resume to the bits of a run that was never interrupted."""

import random
import signal
import time

import pytest

from tests.train import pretrain_runs as runs

STEPS = 24
FLAGS = (f'--steps={STEPS}', '--checkpoint_every=2', '--keep_checkpoints=2')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('reference')
  runs.run(run_dir, *FLAGS)
  return runs.results(run_dir)['param_hash']


def _wait_for_checkpoint(run_dir, proc, timeout=240.0):
  deadline = time.time() + timeout
  while not runs.checkpoint_steps(run_dir):
    assert proc.poll() is None, 'the run ended before writing a checkpoint'
    assert time.time() < deadline, 'no checkpoint appeared'
    time.sleep(0.05)


@pytest.mark.parametrize('trial', range(3))
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference, tmp_path, trial):
  delay = random.Random(trial).uniform(0.0, 2.0)  # a different step each trial, reproducibly
  proc = runs.start(tmp_path, *FLAGS, log=tmp_path / 'killed.log')
  _wait_for_checkpoint(tmp_path, proc)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  survived = runs.checkpoint_steps(tmp_path)
  assert survived and survived[-1] < STEPS, f'kill came too late (checkpoints {survived}); lower the delay'
  done = runs.run(tmp_path, *FLAGS)
  assert f'Resumed from step {survived[-1]}' in done.stderr
  assert runs.results(tmp_path)['param_hash'] == reference
  steps = sorted(runs.losses(tmp_path))
  assert steps == list(range(1, STEPS + 1))  # every step logged once, none twice


def test_sigterm_saves_and_exits_cleanly(reference, tmp_path):
  proc = runs.start(tmp_path, *FLAGS, '--checkpoint_every=0', log=tmp_path / 'term.log')
  while not (tmp_path / 'metrics.jsonl').exists() or not runs.losses(tmp_path):
    assert proc.poll() is None, (tmp_path / 'term.log').read_text()[-2000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  log = (tmp_path / 'term.log').read_text()
  saved = runs.checkpoint_steps(tmp_path)
  assert len(saved) == 1 and 0 < saved[0] < STEPS, saved  # the only checkpoint is the one SIGTERM asked for
  assert f'Stop requested (SIGTERM) at step {saved[0]}' in log
  assert not (tmp_path / 'results.json').exists()
  runs.run(tmp_path, *FLAGS, '--checkpoint_every=0')
  assert runs.results(tmp_path)['param_hash'] == reference
