"""Training transforms: the protocol (defaults, chain, state, rng, jit), and a stateful transform that is
checkpointed, sharded and resumed bit for bit, in process and after a SIGKILL.

Run as a script (`python -m tests.train.test_transforms RUN_DIR ...`) it trains the toy model with the toy
gradual-pruning transform below and prints one JSON line of hashes; the kill and 8-device tests use that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging

from jaxcompress import core, models
from jaxcompress.data.pipeline import LMBatches
from jaxcompress.train import checkpoint, loop, objectives, optim, sharding, transforms
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib
from tests.train import pretrain_runs

MODEL = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
SEQUENCES = np.random.RandomState(0).randint(0, 64, (64, 17)).astype(np.int32)
STEPS, EVERY = 12, 3



# A toy gradual magnitude pruning transform ---------------------------------------------------------------------


def _where(masks, tree):
  return jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)), masks, tree,
                      is_leaf=lambda x: x is None)


def gradual_pruning(*, final_sparsity: float = 0.6, ramp_steps: int = 9, every: int = EVERY
                    ) -> transforms.Transform:
  """Sparsity follows a cubic ramp to final_sparsity over ramp_steps. Each step folds |w| of every block kernel
  into a moving average (the saliency); every `every` steps each kernel's mask is recomputed from its saliency
  jittered by the step's rng (a stochastic tie-break), keeping exactly round((1 - sparsity) * size) entries.
  State: {'masks': bool, 'saliency': f32 (trees like params, None off the kernels), 'sparsity': f32 scalar}."""

  def target(step):
    frac = jnp.minimum(step.astype(jnp.float32) / ramp_steps, 1.0)
    return final_sparsity * (1 - (1 - frac) ** 3)

  def init(params):
    chosen = set(core.select(params).paths)
    masks = core.map_with_path(lambda p, w: jnp.ones(w.shape, bool) if p in chosen else None, params)
    saliency = core.map_with_path(lambda p, w: jnp.abs(w) if p in chosen else None, params)
    return {'masks': masks, 'saliency': saliency, 'sparsity': jnp.zeros((), jnp.float32)}

  def update(params, state, step, rng):
    sparsity = target(step)
    saliency = jax.tree.map(lambda s, w: s if s is None else 0.8 * s + 0.2 * jnp.abs(w), state['saliency'], params,
                            is_leaf=lambda x: x is None)

    def recompute():
      scores, treedef = jax.tree.flatten(saliency, is_leaf=lambda x: x is None)
      new = []
      for i, s in enumerate(scores):
        if s is None:
          new.append(None)
          continue
        jittered = s * jnp.exp(0.05 * jax.random.normal(jax.random.fold_in(rng, i), s.shape))
        ranks = jnp.argsort(jnp.argsort(jittered.ravel())).reshape(s.shape)
        new.append(ranks >= jnp.round(sparsity * s.size).astype(ranks.dtype))
      return treedef.unflatten(new)

    masks = jax.lax.cond(step % every == 0, recompute, lambda: state['masks'])
    return _where(masks, params), {'masks': masks, 'saliency': saliency, 'sparsity': sparsity}

  def forward(params, state):
    return _where(state['masks'], params)

  return transforms.Transform(init=init, update=update, forward=forward)


class _KillAt:
  """Data that SIGKILLs its own process when asked for the batch of a chosen step (a crash at a known step)."""

  def __init__(self, data, step):
    self.data, self.step = data, step

  def fingerprint(self):
    return self.data.fingerprint()

  def batch(self, step, **kwargs):
    if step == self.step:
      os.kill(os.getpid(), signal.SIGKILL)
    return self.data.batch(step, **kwargs)


def _fit(run_dir, *, steps=STEPS, kill_at=None, mesh=(-1, 1, 1), async_checkpoint=False, **kwargs):
  params = jax.jit(MODEL.init)(loop.rng_stream(0, 'init'))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, total_steps=steps))
  cfg = loop.LoopConfig(steps=steps, batch_size=8, run_dir=str(run_dir), log_every=1, checkpoint_every=EVERY,
                        progress=False, async_checkpoint=async_checkpoint, mesh=mesh, **kwargs)
  data = LMBatches(sequences=SEQUENCES, batch_size=8, seed=0)
  if kill_at is not None:
    data = _KillAt(data, kill_at)
  return loop.fit(cfg, model=MODEL, params=params, objective=objectives.causal_lm(MODEL), optimizer=opt,
                  data=data, transforms=gradual_pruning())


def _hashes(result) -> dict:
  return {'params': state_lib.param_hash(result.state.params),
          'transform_state': state_lib.param_hash(result.state.transform_state)}


# The protocol --------------------------------------------------------------------------------------------------


def _toy(name, *, touch=True):
  """Counts its updates, records its step and rng; when `touch`, forward and update map x -> 10 x + name."""
  f = (lambda x: 10 * x + name) if touch else (lambda x: x)

  def init(params):
    del params
    return {'count': jnp.zeros((), jnp.int32), 'step': jnp.zeros((), jnp.int32), 'key': jnp.zeros((2,), jnp.uint32)}

  def update(params, state, step, rng):
    return jax.tree.map(f, params), {'count': state['count'] + 1, 'step': step, 'key': jax.random.key_data(rng)}

  return transforms.Transform(init, update, lambda p, s: jax.tree.map(f, p))


def test_defaults_are_identities():
  t = transforms.Transform()
  params = {'w': jnp.arange(3.0)}
  assert t.init(params) == ()
  out, state = t.update(params, (), jnp.int32(1), jax.random.key(0))
  assert out is params and state == ()
  assert t.forward(params, ()) is params
  assert transforms.identity() == t
  assert transforms.as_transform(()).init(params) == ()


def test_chain_runs_left_to_right_threads_state_and_splits_rng():
  a, b = _toy(1.0), _toy(2.0)
  params = {'w': jnp.zeros(2)}
  both = transforms.chain(a, b)
  state = both.init(params)
  assert isinstance(state, tuple) and len(state) == 2
  np.testing.assert_array_equal(both.forward(params, state)['w'], [12.0, 12.0])  # a, then b
  np.testing.assert_array_equal(transforms.chain(b, a).forward(params, state)['w'], [21.0, 21.0])
  jitted = jax.jit(both.update)
  for step in (1, 2, 3):
    params, state = jitted(params, state, jnp.int32(step), jax.random.key(0))
  np.testing.assert_array_equal(params['w'], [121212.0, 121212.0])
  assert [int(s['count']) for s in state] == [3, 3] and [int(s['step']) for s in state] == [3, 3]
  assert not np.array_equal(state[0]['key'], state[1]['key'])  # each member its own stream
  assert len(transforms.as_transform([a, b, a]).init(params)) == 3
  with pytest.raises(TypeError, match='argument 1 is a function, not a Transform'):
    transforms.chain(a, lambda p: p)


def _rng_objective(params, frozen, batch, rng):
  """A loss whose gradient depends on the objective's rng (a random linear term)."""
  del frozen
  noise = jax.random.normal(rng, params['w'].shape)
  loss = jnp.sum((batch['x'] @ params['w']) ** 2) + jnp.sum(params['w'] * noise)
  return loss, (jnp.asarray(batch['x'].shape[0], jnp.float32), {})


def _train(transforms_, steps=3, tx=optax.sgd(0.01)):
  params = {'w': jnp.ones((4, 2))}
  state = state_lib.init_state(params, tx, jax.random.key(0), transforms=transforms_)
  step = jax.jit(step_lib.make_train_step(_rng_objective, tx, transforms=transforms_))
  batch = {'x': jnp.asarray(np.random.RandomState(0).randn(8, 4), jnp.float32)}
  for _ in range(steps):
    state, metrics = step(state, batch)
  return state, metrics


def test_step_threads_state_and_adding_a_transform_keeps_the_objective_rng():
  plain, _ = _train(())
  counted, _ = _train(_toy(0.0, touch=False))  # draws from its rng, leaves params alone
  assert state_lib.param_hash(plain.params) == state_lib.param_hash(counted.params)
  assert int(counted.transform_state['count']) == 3 == int(counted.step) == int(counted.transform_state['step'])
  keys = [np.asarray(_train(_toy(0.0, touch=False), steps=n)[0].transform_state['key']) for n in (1, 2)]
  assert not np.array_equal(keys[0], keys[1])  # a new key every step


def test_a_non_finite_step_leaves_the_transform_state_unchanged():
  state, _ = _train(_toy(0.0, touch=False), steps=1, tx=optax.sgd(1e30))  # the first update overflows
  step = jax.jit(step_lib.make_train_step(_rng_objective, optax.sgd(1e30), transforms=_toy(0.0, touch=False)))
  state2, m2 = step(state, {'x': jnp.ones((8, 4))})
  assert m2['finite'] == 0.0 and int(state2.transform_state['count']) == 1


# The toy gradual pruning transform in loop.fit ------------------------------------------------------------------


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
  return _fit(tmp_path_factory.mktemp('whole'))


@pytest.mark.slow
def test_gradual_pruning_follows_its_schedule(whole):
  state = whole.state.transform_state
  np.testing.assert_allclose(state['sparsity'], 0.6, rtol=1e-6)  # the ramp ended at step 9
  for path in core.select(whole.state.params).paths:
    w = np.asarray(core.paths.get(whole.state.params, path))
    mask = np.asarray(core.paths.get(state['masks'], path))
    assert (w == 0).sum() == (~mask).sum() == round(0.6 * w.size), path  # masks recomputed at step 12


def test_stop_and_resume_restores_params_and_transform_state_bit_for_bit(whole, tmp_path, monkeypatch):
  first = _fit(tmp_path / 'run', stop_at_step=5)  # between two mask updates
  assert first.status == 'stopped' and int(first.state.step) == 5
  shutil.copytree(tmp_path / 'run', tmp_path / 'control')
  rest = _fit(tmp_path / 'run')
  assert _hashes(rest) == _hashes(whole)
  # Control: the same resume with the transform state re-initialized instead of restored ends elsewhere.
  restore = checkpoint.Checkpointer.restore_latest

  def forget_transform_state(self, abstract):
    state, meta = restore(self, abstract)
    fresh = jax.tree.map(lambda a, b: jax.device_put(b, a.sharding), state['transform_state'],
                         gradual_pruning().init(state['params']))
    return {**state, 'transform_state': fresh}, meta

  monkeypatch.setattr(checkpoint.Checkpointer, 'restore_latest', forget_transform_state)
  control = _fit(tmp_path / 'control')
  assert _hashes(control)['params'] != _hashes(whole)['params']


def test_another_transform_state_is_refused_by_fingerprint(tmp_path):
  _fit(tmp_path, stop_at_step=3)
  params = jax.jit(MODEL.init)(loop.rng_stream(0, 'init'))
  cfg = loop.LoopConfig(steps=STEPS, batch_size=8, run_dir=str(tmp_path), progress=False, async_checkpoint=False)
  with pytest.raises(checkpoint.CheckpointError, match='transform_state'):
    loop.fit(cfg, model=MODEL, params=params, objective=objectives.causal_lm(MODEL),
             optimizer=optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-2, total_steps=STEPS)),
             data=LMBatches(sequences=SEQUENCES, batch_size=8, seed=0),
             transforms=transforms.chain(gradual_pruning(), gradual_pruning()))


def _script(run_dir, *flags, devices=1, check=True, env=None):
  proc = subprocess.run([sys.executable, '-m', 'tests.train.test_transforms', str(run_dir), *flags],
                        env=env or pretrain_runs.env(devices), capture_output=True, text=True, timeout=300,
                        cwd=pretrain_runs.ROOT)
  if check and proc.returncode != 0:
    raise AssertionError(f'script failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize('kill_at', [7])
def test_sigkill_at_a_step_then_resume_is_bit_identical(whole, tmp_path, kill_at, monkeypatch):
  # The uninterrupted run of this process is the reference; the script runs its programs (one device, this
  # process's settings), so the compilation cache has them.
  killed = _script(tmp_path / 'run', f'--kill_at={kill_at}', check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  survived = pretrain_runs.checkpoint_steps(tmp_path / 'run')
  assert survived and max(survived) < kill_at, survived
  # Resumed here, as the script would (asynchronous saves): what the killed process left on disk is all it reads.
  said = []
  monkeypatch.setattr(logging, 'info', lambda msg, *args, **_: said.append(str(msg) % args if args else str(msg)))
  resumed = _fit(tmp_path / 'run', async_checkpoint=True)
  assert any(f'Resumed from step {max(survived)} ' in line for line in said), said
  assert resumed.status == 'completed' and _hashes(resumed) == _hashes(whole)


@pytest.mark.slow
@pytest.mark.subprocess
def test_transform_state_is_sharded_like_the_params_on_8_devices(tmp_path):
  out = json.loads(_script(tmp_path, '--mesh=2,2,2', '--steps=2', devices=8).stdout.splitlines()[-1])
  assert out['devices'] == 8
  assert out['sharded_masks'] >= 7, out  # every block kernel's mask is split over fsdp x tensor
  assert out['masks_like_params'], out
  assert out['channel_spec'] == [None, 'tensor'], out  # [1, out]: 'fsdp' dropped where it does not divide


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('run_dir')
  ap.add_argument('--kill_at', type=int, default=None)
  ap.add_argument('--steps', type=int, default=STEPS)
  ap.add_argument('--mesh', default='-1,1,1')
  args = ap.parse_args(argv)
  logging.set_verbosity(logging.INFO)  # the 'Resumed from step' line
  mesh = tuple(int(x) for x in args.mesh.split(','))
  result = _fit(args.run_dir, steps=args.steps, kill_at=args.kill_at, mesh=mesh, async_checkpoint=True)
  out = {**_hashes(result), 'devices': jax.device_count()}
  if jax.device_count() > 1:
    masks = result.state.transform_state['masks']
    pairs = [(core.paths.get(result.state.params, p), m) for p, m in core.flatten(masks).items() if m is not None]
    out['masks_like_params'] = all(m.sharding.spec == w.sharding.spec for w, m in pairs)
    out['sharded_masks'] = sum(len(m.sharding.device_set) > 1 and not m.sharding.is_fully_replicated
                               for _, m in pairs)
    mesh_ = sharding.make_mesh(*mesh)
    kernels = set(core.select(result.state.params).paths)
    channel = {'transform_state': core.map_with_path(  # per-output-channel arrays [1, out] at kernel paths
        lambda p, w: jax.ShapeDtypeStruct((1, core.shape_of(w)[1]), jnp.float32) if p in kernels else None,
        result.state.params)}
    specs = sharding.param_specs(result.state.params, mesh_, MODEL.sharding_rules())
    spec = core.paths.get(sharding.tree_shardings(channel, specs, mesh_)['transform_state'],
                          'layers/0/mlp/up_proj/kernel').spec
    out['channel_spec'] = list(spec)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
