"""States that must not lose work or lie: retention during asynchronous saves, poisoned updates, refused
resumes that leave the run directory untouched, fingerprints of seed and data, every batch validated."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxcompress import models
from jaxcompress.data.pipeline import LMBatches
from jaxcompress.train import checkpoint, loop, metrics, objectives, optim
from jaxcompress.train import state as state_lib

ROOT = Path(__file__).resolve().parents[2]
MODEL = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
SEQUENCES = np.random.RandomState(0).randint(0, 64, (64, 17)).astype(np.int32)



def _fit(run_dir, *, seed=0, steps=8, lr=1e-2, model=MODEL, data=None, optimizer=None, **kwargs):
  params = jax.jit(model.init)(loop.rng_stream(seed, 'init'))
  opt = optimizer or optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, total_steps=steps))
  cfg = loop.LoopConfig(steps=steps, batch_size=8, run_dir=str(run_dir), seed=seed, log_every=1,
                        checkpoint_every=kwargs.pop('checkpoint_every', 4), progress=kwargs.pop('progress', False),
                        async_checkpoint=kwargs.pop('async_checkpoint', False), **kwargs)
  data = data or LMBatches(sequences=SEQUENCES, batch_size=cfg.batch_size, seed=seed)
  return loop.fit(cfg, model=model, params=params, objective=objectives.causal_lm(model), optimizer=opt,
                  data=data)


def _committed(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# Retention ---------------------------------------------------------------------------------------------------


def test_asynchronous_saves_never_leave_fewer_than_keep_committed(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, fingerprint={'m': 1}, keep=2, best_metric='valid/loss',
                                 async_save=True)
  state = {'w': np.arange(1 << 16, dtype=np.float32)}
  history = []
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.7)]:
    ckpt.save(step, state, metrics={'valid/loss': loss})
    history.append(_committed(tmp_path))  # while `step` may still be in flight
  ckpt.wait()
  # at every moment the newest `keep` committed steps before the one in flight were all still there
  for step, seen in zip(range(1, 6), history):
    assert set(range(max(1, step - 2), step)) <= set(seen), (step, seen)
  assert ckpt.steps() == [2, 4, 5]  # newest two plus the best by valid/loss
  ckpt.close()


_KILL_IN_SAVE = textwrap.dedent('''
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from jaxcompress.train import checkpoint
    original = checkpoint.Checkpointer.save
    def save_then_die(self, step, *args, **kwargs):
      original(self, step, *args, **kwargs)
      if step == {kill_at}:  # the save has started, its commit is still in flight
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save_then_die
    from tests.train import test_engine_safety as t
    t._fit({run_dir!r}, steps=8, checkpoint_every=2, keep_checkpoints={keep}, async_checkpoint=True)
''')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """The param hash of the run the killed ones resume to."""
  return state_lib.param_hash(_fit(tmp_path_factory.mktemp('whole'), steps=8, checkpoint_every=2).state.params)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize('keep', [1, 2])
def test_kill_during_an_asynchronous_save_keeps_keep_checkpoints(tmp_path, keep, uninterrupted):
  run_dir = tmp_path / 'run'
  script = _KILL_IN_SAVE.format(root=str(ROOT), kill_at=6, run_dir=str(run_dir), keep=keep)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(ROOT)}
  proc = subprocess.run([sys.executable, '-c', script], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  ckpt = checkpoint.Checkpointer(run_dir / 'checkpoints', fingerprint={})
  survived = ckpt.steps()
  ckpt.close()
  assert len(survived) >= keep and survived[-1] >= 4, survived
  rest = _fit(run_dir, steps=8, checkpoint_every=2, keep_checkpoints=keep)
  assert [h['step'] for h in rest.history if 'train/loss' in h][0] == survived[-1] + 1
  assert state_lib.param_hash(rest.state.params) == uninterrupted


# Non-finite updates ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_update_that_overflows_the_parameters_is_never_saved(tmp_path):
  run = tmp_path / 'blowup'
  _fit(run, steps=12, checkpoint_every=1, stop_at_step=2)  # good checkpoints 1 and 2
  # a finite loss and gradient, but a learning rate that sends the updated parameters to inf
  with pytest.raises(loop.NonFiniteLoss, match=r'step 3: .*Last good checkpoint: step 2 '):
    _fit(run, steps=12, checkpoint_every=1, lr=float('inf'))
  ckpt = checkpoint.Checkpointer(run / 'checkpoints', fingerprint={})
  assert ckpt.steps() == [1, 2]
  ckpt.close()
  rest = _fit(run, steps=12, checkpoint_every=4)  # the sane rerun finishes from the named checkpoint
  assert rest.status == 'completed' and int(rest.state.step) == 12
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(rest.state.params))


# Refused resumes ---------------------------------------------------------------------------------------------


def test_refused_resume_leaves_config_and_environment_untouched(tmp_path):
  _fit(tmp_path / 'r', steps=4)
  before = {n: (tmp_path / 'r' / n).read_bytes() for n in ('config.json', 'environment.json')}
  other = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=1,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  with pytest.raises(checkpoint.CheckpointError, match='intermediate_size'):
    _fit(tmp_path / 'r', steps=8, model=other)
  assert {n: (tmp_path / 'r' / n).read_bytes() for n in before} == before


def test_resume_with_another_seed_or_data_is_refused_unless_forced(tmp_path):
  _fit(tmp_path / 'r', steps=4)
  with pytest.raises(checkpoint.CheckpointError, match=r'seed.*checkpoint has 0, this run has 1'):
    _fit(tmp_path / 'r', steps=8, seed=1)
  shuffled = LMBatches(sequences=SEQUENCES[::-1].copy(), batch_size=8, seed=0)  # another split or tokenizer
  with pytest.raises(checkpoint.CheckpointError, match=r'data'):
    _fit(tmp_path / 'r', steps=8, data=shuffled)
  forced = _fit(tmp_path / 'r', steps=8, seed=1, force_resume=True)
  assert [h['step'] for h in forced.history if 'train/loss' in h] == [5, 6, 7, 8]


def test_data_fingerprint_names_rows_and_order():
  a = LMBatches(sequences=SEQUENCES, batch_size=8, seed=0)
  assert a.fingerprint() == LMBatches(sequences=SEQUENCES.copy(), batch_size=8, seed=0).fingerprint()
  assert a.fingerprint() != LMBatches(sequences=SEQUENCES, batch_size=8, seed=1).fingerprint()
  changed = SEQUENCES.copy()
  changed[3, 5] = (changed[3, 5] + 1) % 64
  assert a.fingerprint() != LMBatches(sequences=changed, batch_size=8, seed=0).fingerprint()


# Batches -----------------------------------------------------------------------------------------------------


class _BadAt:
  """LMBatches whose batch for one step is broken in one field."""

  def __init__(self, step, field, breaker):
    self.inner = LMBatches(sequences=SEQUENCES, batch_size=8, seed=0)
    self.step, self.field, self.breaker = step, field, breaker

  def batch(self, step, process_index=0, process_count=1):
    out = self.inner.batch(step, process_index=process_index, process_count=process_count)
    if step == self.step:
      out[self.field] = self.breaker(out[self.field])
    return out


@pytest.mark.parametrize('field, breaker, match', [
    ('targets', lambda x: x + 64, r'step 5 .*targets.*outside \[0, 64\) \(vocab_size=64\)'),
    ('inputs', lambda x: x[:4], r"step 5 .*inputs.*expected 8 rows"),
    ('inputs', lambda x: x.astype(np.float32), r"step 5 .*inputs.*dtype float32"),
])
def test_a_bad_batch_later_in_the_run_is_named(tmp_path, field, breaker, match):
  with pytest.raises(ValueError, match=match):
    _fit(tmp_path / 'r', steps=8, data=_BadAt(4, field, breaker))


# Progress and metrics log ------------------------------------------------------------------------------------


def test_progress_line_and_metrics_show_the_learning_rate(tmp_path, capsys):
  cfg = optim.OptimizerConfig(learning_rate=1e-2, warmup_steps=4, total_steps=8, schedule='constant')
  result = _fit(tmp_path / 'r', steps=8, progress=True, optimizer=optim.make_optimizer(cfg))
  lrs = [h['train/lr'] for h in result.history if 'train/lr' in h]
  np.testing.assert_allclose(lrs, [0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2, 1e-2, 1e-2], rtol=1e-6)
  last = capsys.readouterr().err.replace('\r', '\n').strip().splitlines()[-1]
  assert '8/8' in last and 'lr=0.01' in last, last


# Metrics log -------------------------------------------------------------------------------------------------


def test_fresh_start_keeps_an_old_metrics_log(tmp_path):
  _fit(tmp_path / 'r', steps=4)
  import shutil
  shutil.rmtree(tmp_path / 'r' / 'checkpoints')
  _fit(tmp_path / 'r', steps=2)
  aside = sorted((tmp_path / 'r').glob('metrics.jsonl.*'))
  assert len(aside) == 1
  assert [r['step'] for r in metrics.read_jsonl(aside[0])] == [1, 2, 3, 4]
  assert [r['step'] for r in metrics.read_jsonl(tmp_path / 'r' / 'metrics.jsonl')] == [1, 2]


def test_restore_errors_keep_their_reason_and_drop_the_store_spec():
  spec = "[tensorstore_spec='{\"context\":{\"cache_pool\":{}},\"driver\":\"zarr\"}'] [source locations='x.cc:1']"
  e = ValueError(f'OUT_OF_RANGE: Error reading "w/0": Requested byte range [0, 44963) is not valid {spec}')
  assert checkpoint.describe_error(e) == ('ValueError: OUT_OF_RANGE: Error reading "w/0": Requested byte range '
                                          '[0, 44963) is not valid')

  class MethodText(Exception):
    def __str__(self):
      return repr(self.message)

    def message(self):
      return ''

  assert checkpoint.describe_error(MethodText('DATA_LOSS: truncated')) == 'MethodText: DATA_LOSS: truncated'
