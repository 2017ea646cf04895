"""Killed and pre-empted training runs resume to the bits of a run that was never interrupted."""

import random
import signal
import time

import pytest

from jaxcompress.train import metrics
from tests.train import pretrain_runs as runs

STEPS = 24
FLAGS = (f'--steps={STEPS}', '--checkpoint_every=2', '--keep_checkpoints=2')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('reference')
  runs.run(run_dir, *FLAGS)
  return runs.results(run_dir)['param_hash']


def _last_step(run_dir) -> int:
  path = run_dir / 'metrics.jsonl'
  return max((r['step'] for r in metrics.read_jsonl(path)), default=0) if path.exists() else 0


def _wait_for_step(run_dir, proc, step, timeout=240.0):
  deadline = time.time() + timeout
  while _last_step(run_dir) < step:
    assert proc.poll() is None, f'the run ended before step {step}'
    assert time.time() < deadline, f'step {step} did not come'
    time.sleep(0.005)


def _wait_for_resume(log, proc, step, timeout=240.0):
  """Until the process logged its resume, which must be from `step` (it then trims the records of later steps that
  a kill left)."""
  deadline = time.time() + timeout
  while 'Resumed from step ' not in (text := log.read_text()):
    assert proc.poll() is None, f'the run ended before resuming from step {step}:\n{text[-3000:]}'
    assert time.time() < deadline, f'no resume from step {step}'
    time.sleep(0.005)
  assert f'Resumed from step {step} ' in text, text[-3000:]


# One run killed three times, each time at a step and phase drawn from a window (mid-step, mid-save, mid-deletion
# of an old checkpoint), reproducibly; counted in steps, not seconds, so a faster machine does not push a kill past
# the end. Each kill hits the run resumed after the kill before (three kills take four runs, not six); the windows
# lie 4+ steps apart, so a kill waits for steps the resumed run made, not for records the killed one left.
KILL_WINDOWS = ((3, 5), (9, 11), (STEPS - 9, STEPS - 8))


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_at_random_steps_then_resume_is_bit_identical(reference, tmp_path):
  rng = random.Random(0)
  survived = []
  for i, (first, last) in enumerate(KILL_WINDOWS):
    step, phase = rng.randint(first, last), rng.uniform(0.0, 0.05)
    log = tmp_path / f'killed{i}.log'
    proc = runs.start(tmp_path, *FLAGS, log=log)
    if survived:
      _wait_for_resume(log, proc, survived[-1])
    _wait_for_step(tmp_path, proc, step)
    time.sleep(phase)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f'the run ended before the kill at step {step}'
    survived = runs.checkpoint_steps(tmp_path)
  done = runs.run(tmp_path, *FLAGS)
  if survived:  # none when a kill beat the first save's commit: the resumed run starts afresh
    assert f'Resumed from step {survived[-1]}' in done.stderr
  assert runs.results(tmp_path)['param_hash'] == reference
  steps = sorted(runs.losses(tmp_path))
  assert steps == list(range(1, STEPS + 1))  # every step logged once, none twice


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigterm_saves_and_exits_cleanly(reference, tmp_path):
  proc = runs.start(tmp_path, *FLAGS, '--checkpoint_every=0', log=tmp_path / 'term.log')
  _wait_for_step(tmp_path, proc, 1)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  log = (tmp_path / 'term.log').read_text()
  saved = runs.checkpoint_steps(tmp_path)
  assert len(saved) == 1 and 0 < saved[0] < STEPS, saved  # the only checkpoint is the one SIGTERM asked for
  assert f'Stop requested (SIGTERM) at step {saved[0]}' in log
  assert not (tmp_path / 'results.json').exists()
  runs.run(tmp_path, *FLAGS, '--checkpoint_every=0')
  assert runs.results(tmp_path)['param_hash'] == reference
