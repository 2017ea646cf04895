"""The training loop in process: reproducibility, retention, recovery from damage, and bad input."""

import json
import shutil

import jax
import numpy as np
import pytest
from absl import logging

from jaxcompress import models
from jaxcompress.data.pipeline import LMBatches
from jaxcompress.train import checkpoint, loop, objectives, optim
from jaxcompress.train import state as state_lib

MODEL = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
SEQUENCES = np.random.RandomState(0).randint(0, 64, (64, 17)).astype(np.int32)



def _fit(run_dir, *, seed=0, steps=8, lr=1e-2, model=MODEL, data=None, **kwargs):
  params = jax.jit(model.init)(loop.rng_stream(seed, 'init'))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, total_steps=steps, grad_clip=kwargs.pop(
      'grad_clip', 1.0)))
  cfg = loop.LoopConfig(steps=steps, batch_size=kwargs.pop('batch_size', 8), run_dir=str(run_dir), seed=seed,
                        log_every=1, checkpoint_every=kwargs.pop('checkpoint_every', 4), progress=False,
                        async_checkpoint=False, **kwargs)
  data = data or LMBatches(sequences=SEQUENCES, batch_size=cfg.batch_size, seed=seed)
  return loop.fit(cfg, model=model, params=params, objective=objectives.causal_lm(model), optimizer=opt,
                  data=data)


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
  """An uninterrupted run of `_fit`'s defaults (seed 0, 8 steps): interrupted ones must end at its bits."""
  return _fit(tmp_path_factory.mktemp('whole') / 'r')


def test_same_seed_same_bits_different_seed_different(tmp_path, whole):
  a = _fit(tmp_path / 'a', seed=3)
  b = _fit(tmp_path / 'b', seed=3)
  assert state_lib.param_hash(a.state.params) == state_lib.param_hash(b.state.params)
  assert state_lib.param_hash(a.state.params) != state_lib.param_hash(whole.state.params)  # seed 0
  assert a.status == 'completed' and int(a.state.step) == 8
  assert [h['train/loss'] for h in a.history] == [h['train/loss'] for h in b.history]


def test_run_dir_records_config_environment_and_metrics(whole):
  run_dir = whole.run_dir
  cfg = json.loads((run_dir / 'config.json').read_text())
  env = json.loads((run_dir / 'environment.json').read_text())
  assert cfg['loop']['steps'] == 8 and cfg['loop']['seed'] == 0
  assert env['packages']['jax'] == jax.__version__ and 'git_revision' in env
  lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(l)['step'] for l in lines] == list(range(1, 9))
  assert list((run_dir / 'tb').glob('events.out.tfevents.*'))


def test_stop_and_resume_is_bit_identical(tmp_path, whole):
  first = _fit(tmp_path / 'parts', stop_at_step=5)
  assert first.status == 'stopped' and int(first.state.step) == 5
  rest = _fit(tmp_path / 'parts')
  assert int(rest.state.step) == 8
  assert state_lib.param_hash(rest.state.params) == state_lib.param_hash(whole.state.params)
  # the resumed run only logged steps 6..8, and the metrics file has each step once
  assert [h['step'] for h in rest.history if 'train/loss' in h] == [6, 7, 8]


def test_damaged_newest_checkpoint_falls_back_with_warning(tmp_path, monkeypatch, whole):
  _fit(tmp_path / 'parts', stop_at_step=6)  # checkpoints 4 and 6
  ckpt_dir = tmp_path / 'parts' / 'checkpoints'
  assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [4, 6]
  _flip_bytes(ckpt_dir / '6')
  warnings = []
  monkeypatch.setattr(logging, 'warning', lambda msg, *args: warnings.append(msg % args))
  rest = _fit(tmp_path / 'parts')
  assert any('step 6' in w and 'damaged' in w and 'step 4' in w for w in warnings), warnings
  assert state_lib.param_hash(rest.state.params) == state_lib.param_hash(whole.state.params)


def test_steps_a_crash_left_half_written_or_half_deleted_are_set_aside(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, fingerprint={'m': 1}, keep=5, async_save=False)
  for step in (1, 2, 3, 4):
    ckpt.save(step, {'w': np.full(4, step, np.float32)})
  ckpt.close()
  shutil.rmtree(tmp_path / '2' / 'meta')  # deletion interrupted: arrays left, record gone
  (tmp_path / '4' / '_CHECKPOINT_METADATA').unlink()  # write interrupted
  shutil.rmtree(tmp_path / '4' / 'meta')
  ckpt = checkpoint.Checkpointer(tmp_path, fingerprint={'m': 1}, keep=5, async_save=False)
  state, meta = ckpt.restore_latest({'w': jax.ShapeDtypeStruct((4,), np.float32)})
  assert meta['step'] == 3 and np.all(np.asarray(state['w']) == 3)
  assert ckpt.steps() == [1, 3]
  assert sorted(p.name for p in tmp_path.iterdir() if 'damaged' in p.name) == ['2.damaged', '4.damaged']
  ckpt.save(4, {'w': np.full(4, 40, np.float32)})  # the step number is free again
  ckpt.wait()
  assert ckpt.steps() == [1, 3, 4]
  ckpt.close()


def test_keeps_newest_and_best(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, fingerprint={'m': 1}, keep=2, best_metric='valid/loss',
                                 async_save=False)
  state = {'w': np.arange(4, dtype=np.float32)}
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.7)]:
    ckpt.save(step, state, metrics={'valid/loss': loss})
  ckpt.wait()
  assert ckpt.steps() == [2, 4, 5]
  ckpt.close()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  _fit(tmp_path / 'nan', stop_at_step=4, steps=40)  # a good checkpoint at step 4
  with pytest.raises(loop.NonFiniteLoss, match=r'not finite.*Last good checkpoint: step 4 .*learning rate'):
    _fit(tmp_path / 'nan', lr=1e9, steps=40)  # resumes at 4, then diverges
  ckpt = checkpoint.Checkpointer(tmp_path / 'nan' / 'checkpoints', fingerprint={})
  assert ckpt.steps() == [4]  # nothing written after the bad step
  assert np.isfinite(ckpt.read_meta(4)['metrics']['loss'])


def test_checkpoint_dir_of_another_model_is_refused(tmp_path):
  _fit(tmp_path / 'r', steps=4)
  other = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_layers=1,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  with pytest.raises(checkpoint.CheckpointError, match=r'different run.*intermediate_size.*64.*96'):
    _fit(tmp_path / 'r', steps=8, model=other)


def test_checkpoint_of_another_optimizer_is_refused(tmp_path):
  _fit(tmp_path / 'r', steps=4)
  with pytest.raises(checkpoint.CheckpointError, match=r'different run.*optimizer_state'):
    _fit(tmp_path / 'r', steps=8, grad_clip=None)  # no clipping state in the optimizer


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match=r'batch_size=6 must be a multiple of 4.*accum_steps=4'):
    _fit(tmp_path / 'a', batch_size=6, accum_steps=4)

  class WrongShape:
    def batch(self, step, process_index=0, process_count=1):
      return {'inputs': np.zeros((8, 16), np.float32), 'targets': np.zeros((8, 16), np.int32)}

  with pytest.raises(ValueError, match=r"batch\['inputs'\] has dtype float32"):
    _fit(tmp_path / 'b', data=WrongShape())
  with pytest.raises(ValueError, match='compute_dtype'):
    loop.LoopConfig(steps=1, batch_size=1, run_dir='x', compute_dtype='float33')
  with pytest.raises(ValueError, match=r'mesh data=3 x fsdp=1 x tensor=1 = 3 devices'):
    from jaxcompress.train import sharding
    sharding.make_mesh(3, 1, 1)


def _flip_bytes(step_dir):
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  target.write_bytes(bytes(data))


def test_a_second_run_into_a_directory_in_use_is_refused_not_resumed(tmp_path, whole):
  """While a run trains into run_dir (here: another open file description holds its lock, as another process
  would), a second fit there is refused before it reads or writes anything; once the lock is gone it runs."""
  import fcntl
  shutil.copytree(whole.run_dir, tmp_path / 'r')  # a directory with checkpoints a second run could resume from
  with open(tmp_path / 'r' / '.lock', 'a+') as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    before = sorted(p.name for p in (tmp_path / 'r').rglob('*'))
    with pytest.raises(RuntimeError, match=r"run_dir .*/r is in use: another training run holds .*/r/\.lock"):
      _fit(tmp_path / 'r')
    assert sorted(p.name for p in (tmp_path / 'r').rglob('*')) == before
  assert _fit(tmp_path / 'r').status == 'completed'  # released: the run resumes (already at its last step)
