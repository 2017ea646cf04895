"""`fit`: the training loop every family uses (recovery fine-tuning, QAT, distillation, sparse training).

    result = fit(LoopConfig(steps=1000, batch_size=32, run_dir='runs/x'), model=model, params=params,
                 objective=objectives.causal_lm(model), optimizer=tx, data=batches, eval_fn=evaluate)

What it does around the jit-compiled step:
- places the state on a ('data', 'fsdp', 'tensor') mesh by parameter-path rules; batches over data × fsdp;
  each process feeds only its own rows (the same code on one CPU, 8 devices or a multi-host pod);
- resumes from the newest verified checkpoint in run_dir (bit-identical to an uninterrupted run: the data
  order is a pure function of (seed, step) and the state holds params, optimizer state and rng);
- saves asynchronously every `checkpoint_every` steps, on SIGTERM (then returns with status 'preempted')
  and at the end, keeping the newest `keep_checkpoints` and the best by `best_metric`;
- writes metrics.jsonl and TensorBoard events, shows progress with tokens/s and ETA on process 0;
- stops at the first non-finite loss: that update is not applied, no checkpoint is written after it, and
  `NonFiniteLoss` says which step, what the last good checkpoint is, and what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxcompress import provenance
from jaxcompress.train import checkpoint as ckpt_lib
from jaxcompress.train import metrics as metrics_lib
from jaxcompress.train import sharding as sharding_lib
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib
from jaxcompress.train import transforms as transforms_lib
from jaxcompress.train.objectives import Objective


class Batches(Protocol):
  """Random-access data: the rows of the global batch for `step` that belong to this process."""

  def batch(self, step: int, *, process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    ...


class NonFiniteLoss(RuntimeError):
  """Training stopped because a step's loss or gradient was not finite."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
  steps: int  # optimizer steps the run ends at (a resumed run continues up to it)
  batch_size: int  # global sequences per step
  run_dir: str  # checkpoints, metrics, config and environment go here
  seed: int = 0  # every random choice of the run derives from it
  accum_steps: int = 1  # micro-batches per step (gradient accumulation)
  compute_dtype: str = 'float32'  # forward/backward dtype over float32 master weights ('bfloat16' on TPU/GPU)
  mesh: tuple[int, int, int] = (-1, 1, 1)  # (data, fsdp, tensor) device counts; -1 fills
  log_every: int = 10  # steps between metric records
  eval_every: int = 0  # steps between evaluations (0: at the end only)
  checkpoint_every: int = 100  # steps between checkpoints (0: at the end and on SIGTERM only)
  keep_checkpoints: int = 3  # newest checkpoints kept
  best_metric: str | None = None  # also keep the best checkpoint by this eval metric, e.g. 'valid/loss'
  best_mode: str = 'min'  # 'min' or 'max' for best_metric
  async_checkpoint: bool = True  # write checkpoints in the background
  resume: bool = True  # continue from the newest checkpoint in run_dir
  force_resume: bool = False  # resume even if the checkpoint's seed or data differ (the model must match)
  progress: bool = True  # progress line on process 0
  stop_at_step: int | None = None  # end this invocation after this step with a checkpoint (time-limited jobs)

  def __post_init__(self):
    for name in ('steps', 'batch_size', 'accum_steps', 'log_every', 'keep_checkpoints'):
      if getattr(self, name) < 1:
        raise ValueError(f'LoopConfig: {name}={getattr(self, name)} must be >= 1.')
    for name in ('eval_every', 'checkpoint_every'):
      if getattr(self, name) < 0:
        raise ValueError(f'LoopConfig: {name}={getattr(self, name)} must be >= 0.')
    try:
      jnp.dtype(self.compute_dtype)
    except TypeError:
      raise ValueError(f"LoopConfig: compute_dtype={self.compute_dtype!r} is not a dtype; use 'float32' or "
                       "'bfloat16'.") from None


@dataclasses.dataclass
class FitResult:
  state: state_lib.TrainState
  status: str  # 'completed' | 'preempted' (SIGTERM) | 'stopped' (stop_at_step)
  history: list[dict]  # every logged record (metrics of this process's run, not of earlier runs)
  run_dir: Path


def rng_stream(seed: int, name: str) -> jax.Array:
  """Named, independent key streams from one seed: 'init', 'train', 'data', 'calibration', ..."""
  import zlib
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))


@contextlib.contextmanager
def _holding(run_dir: Path, main: bool) -> Iterator[None]:
  """This job's hold on run_dir while it trains (process 0 takes it for the job). A second job training into the
  same directory at the same time would resume from this one's checkpoints and overwrite its records; it is
  refused instead. The lock is advisory (fcntl.flock on run_dir/.lock) and the OS drops it when the process ends,
  however it ends, so a killed run never leaves the directory locked."""
  if not main:
    yield
    return
  import fcntl
  run_dir.mkdir(parents=True, exist_ok=True)
  handle = open(run_dir / '.lock', 'a+')  # noqa: SIM115 (held open for the lock's lifetime)
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    raise RuntimeError(f'run_dir {run_dir} is in use: another training run holds {run_dir / ".lock"}. Give this '
                       'run another run_dir, or wait for that one to end (to resume it later, rerun with the same '
                       'run_dir once it has stopped).') from None
  try:
    yield
  finally:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def fit(cfg: LoopConfig, *, model: Any, params: Any, objective: Objective,
        optimizer: optax.GradientTransformation, data: Batches,
        eval_fn: Callable[[Any], dict[str, float]] | None = None,
        transforms: transforms_lib.Transform | Sequence[transforms_lib.Transform] = (),
        trainable: state_lib.Trainable = state_lib.floating, frozen: Any = None,
        rules=None, mesh: jax.sharding.Mesh | None = None,
        config_record: dict | None = None) -> FitResult:
  """Trains until `cfg.steps` (see module docstring). `params` are the starting point of a fresh run.

  transforms: a `transforms.Transform` or a sequence of them (chained) run inside the step; their state is
  part of the checkpointed, sharded TrainState. A second run into the same `cfg.run_dir` while this one trains
  is refused (RuntimeError), not resumed from this one's checkpoints.
  """
  with _holding(Path(cfg.run_dir), jax.process_index() == 0):
    return _fit(cfg, model=model, params=params, objective=objective, optimizer=optimizer, data=data,
                eval_fn=eval_fn, transforms=transforms, trainable=trainable, frozen=frozen, rules=rules, mesh=mesh,
                config_record=config_record)


def _fit(cfg: LoopConfig, *, model, params, objective, optimizer, data, eval_fn, transforms, trainable, frozen,
         rules, mesh, config_record) -> FitResult:
  run_dir = Path(cfg.run_dir)
  main = jax.process_index() == 0
  mesh = mesh or sharding_lib.make_mesh(*cfg.mesh)
  divisor = sharding_lib.batch_divisor(mesh) * cfg.accum_steps
  if cfg.batch_size % divisor:
    raise ValueError(f'batch_size={cfg.batch_size} must be a multiple of {divisor} (data x fsdp devices = '
                     f'{sharding_lib.batch_divisor(mesh)}, times accum_steps={cfg.accum_steps}); change the batch '
                     'size or the mesh.')
  rng = rng_stream(cfg.seed, 'train')
  make_state = lambda p, f: state_lib.init_state(p, optimizer, rng, trainable=trainable, frozen=f,
                                                 transforms=transforms)
  abstract = jax.eval_shape(make_state, params, frozen)
  shardings = sharding_lib.state_shardings(abstract, mesh, model.sharding_rules() if rules is None else rules)
  state = jax.jit(make_state, out_shardings=shardings)(params, frozen)

  fingerprint = ckpt_lib.fingerprint(model, params, abstract.opt_state)
  if jax.tree.leaves(abstract.transform_state):  # another transform's state is refused by name, not mis-loaded
    fingerprint['transform_state'] = ckpt_lib.fingerprint(model, {}, abstract.transform_state)['optimizer_state']
  fingerprint['run'] = {'seed': cfg.seed, 'data': data.fingerprint() if hasattr(data, 'fingerprint') else None}
  checkpointer = ckpt_lib.Checkpointer(run_dir / 'checkpoints', fingerprint=fingerprint,
                                       keep=cfg.keep_checkpoints, best_metric=cfg.best_metric,
                                       best_mode=cfg.best_mode, async_save=cfg.async_checkpoint,
                                       lenient=('run',) if cfg.force_resume else ())
  restored = None
  if cfg.resume:
    saved_part = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract.checkpointed(), shardings.checkpointed())
    restored = checkpointer.restore_latest(saved_part)  # refuses another run's directory before any write
    if restored is not None:
      state = state.replace(**restored[0])
      logging.info('Resumed from step %d in %s.', int(restored[0]['step']), checkpointer.directory)
  start = int(jax.device_get(state.step))
  if main:
    provenance.write_run_dir(run_dir, config={'loop': cfg, 'mesh': dict(mesh.shape), **(config_record or {})})
    if restored is None:
      metrics_lib.set_aside_log(run_dir)  # a fresh start must not trim away an earlier run's records

  step_fn = step_lib.compile_step(
      step_lib.make_train_step(objective, optimizer, compute_dtype=jnp.dtype(cfg.compute_dtype),
                               accum_steps=cfg.accum_steps, transforms=transforms, trainable=trainable,
                               activation_sharding=sharding_lib.batch_sharding(mesh)),
      state_sharding=shardings, batch_sharding=sharding_lib.batch_sharding(mesh))

  writer = metrics_lib.MetricsWriter(run_dir, enabled=main, resume_step=start)
  progress = metrics_lib.Progress(cfg.steps, enabled=main and cfg.progress, initial=start)
  history: list[dict] = []
  status = 'completed'
  last_metrics: dict[str, float] = {}
  tokens_done = 0

  def record(step: int, device_metrics: dict) -> None:
    """Reads a step's metrics (one step late, so the device stays busy) and stops on a non-finite loss."""
    nonlocal last_metrics
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if m['finite'] < 1:
      good = checkpointer.steps()
      what = ('are not finite' if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])) else
              'are finite but the update made the parameters or optimizer state non-finite')
      raise NonFiniteLoss(
          f'step {step + 1}: loss={m["loss"]}, grad_norm={m["grad_norm"]} {what}; that update was not '
          f'applied and training stopped. Last good checkpoint: '
          f'{"step " + str(good[-1]) if good else "none"} in {checkpointer.directory}. Lower the learning rate, '
          'enable gradient clipping, or use float32 compute.')
    last_metrics = m
    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
      writer.write(step + 1, m, prefix='train/')
      history.append({'step': step + 1, **{f'train/{k}': v for k, v in m.items()}})
    progress.update(step + 1, tokens_done, m)

  def evaluate(step: int) -> dict[str, float]:
    if eval_fn is None:
      return {}
    result = {k: float(v) for k, v in eval_fn(state.params).items()}
    writer.write(step, result)
    history.append({'step': step, **result})
    return result

  pending = None
  with _preemption_flag() as preempted, contextlib.ExitStack() as cleanup:
    cleanup.callback(checkpointer.close)
    cleanup.callback(writer.close)
    cleanup.callback(progress.close)
    vocab_size = getattr(getattr(model, 'config', None), 'vocab_size', None)
    for step in range(start, cfg.steps):
      local = data.batch(step, process_index=jax.process_index(), process_count=jax.process_count())
      try:  # every batch: shapes and dtypes, and the id range by one min/max per field
        step_lib.validate_batch(local, rows=cfg.batch_size // jax.process_count(), vocab_size=vocab_size)
      except ValueError as e:
        raise ValueError(f'step {step + 1} (data.batch({step})): {e}') from None
      batch = sharding_lib.global_batch(local, mesh)
      state, device_metrics = step_fn(state, batch)
      lr = learning_rate(state.opt_state)
      if lr is not None:  # copied now: the next step donates the optimizer state's buffers
        device_metrics = {**device_metrics, 'lr': jnp.copy(lr)}
      tokens_done += int(np.prod(local.get('targets', local['inputs']).shape)) * jax.process_count()
      if pending is not None:
        record(*pending)
      pending = (step, device_metrics)
      done = step + 1
      evals = {}
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        record(*pending)
        pending = None
        evals = evaluate(done)
      stop = _any_process(preempted())
      pause = cfg.stop_at_step is not None and done == cfg.stop_at_step and done != cfg.steps
      if stop or pause or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
        if pending is not None:
          record(*pending)
          pending = None
        checkpointer.save(done, state.checkpointed(), metrics={**last_metrics, **evals})
      if stop:
        status = 'preempted'
        logging.warning('Stop requested (SIGTERM) at step %d: checkpoint saved, exiting cleanly.', done)
        break
      if pause:
        status = 'stopped'
        logging.info('Stopping at step %d as asked (stop_at_step); rerun to continue.', done)
        break
    if pending is not None:
      record(*pending)
    if status == 'completed':
      final = int(jax.device_get(state.step))
      evals = evaluate(final)
      if final not in checkpointer.steps():
        checkpointer.save(final, state.checkpointed(), metrics={**last_metrics, **evals})
  return FitResult(state=state, status=status, history=history, run_dir=run_dir)


@contextlib.contextmanager
def _preemption_flag() -> Iterator[Callable[[], bool]]:
  """Within the context SIGTERM sets a flag (read at step boundaries) instead of killing the process."""
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag.is_set
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: flag.set())
  try:
    yield flag.is_set
  finally:
    signal.signal(signal.SIGTERM, previous)


def learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate of the last update, where the optimizer exposes it (optax.inject_hyperparams, as
  optim.make_optimizer builds them), else None."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if keys[-2:] == ['hyperparams', 'learning_rate']:
      return leaf
  return None


def _any_process(flag: bool) -> bool:
  """True on every process if any process saw the flag (all must save the same step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))
