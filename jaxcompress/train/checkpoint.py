"""Checkpoints with orbax: asynchronous, multi-host, verified on restore.

Each checkpoint step holds the training state (params with compressed leaves, optimizer state, step, rng)
and a JSON record: the run's fingerprint (model config and parameter shapes), metrics, and a checksum of
every bit of the state computed on device when it was saved. orbax only lists a step once its write
committed, so a half-written step is never seen; the checksum catches a committed step whose files were
damaged later. Restoring walks back from the newest step to the newest one that loads and verifies,
warning about each one skipped.

Retention (orbax's preservation policies): the newest `keep` steps, plus the best step by `best_metric` when
one is named. orbax deletes the steps a save retires only after that save has committed, so a crash at any
moment leaves at least `keep` committed steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging


class CheckpointError(Exception):
  """A checkpoint directory cannot serve this run (different model, nothing readable)."""


@jax.jit
def tree_checksum(tree: Any) -> jax.Array:
  """uint32 digest of every bit of every array: bit patterns weighted by position, summed mod 2**32."""
  total = jnp.uint32(0)
  for i, x in enumerate(jax.tree.leaves(tree)):
    bits = _as_uint32(x).ravel()
    weights = (jnp.arange(bits.size, dtype=jnp.uint32) % jnp.uint32(65521)) * jnp.uint32(2) + jnp.uint32(1)
    leaf = jnp.sum(bits * weights, dtype=jnp.uint32) ^ jnp.uint32(bits.size)
    total = total * jnp.uint32(1000003) + leaf + jnp.uint32(i)
  return total


def _as_uint32(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  width = x.dtype.itemsize
  if width == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if width == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if width == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  halves = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types -> [..., 2]
  return halves[..., 0] ^ (halves[..., 1] * jnp.uint32(2654435761))


def _quiet_orbax() -> None:
  """orbax logs every phase of every save at INFO; keep its warnings and errors only."""
  import logging as std_logging
  handler = logging.get_absl_handler()
  if not any(getattr(f, 'jaxcompress', False) for f in handler.filters):
    def keep(record):
      return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname
    keep.jaxcompress = True
    handler.addFilter(keep)


class Checkpointer:
  """Saves and restores a pytree of training state under `directory`.

  fingerprint: JSON-able description of what the state belongs to (model config, parameter shapes, and under
  'run' the seed and the data's fingerprint); a directory holding another fingerprint is refused rather than
  silently mixed.
  lenient: top-level fingerprint keys whose differences are only warned about (an explicit forced resume).
  """

  def __init__(self, directory: str | os.PathLike, *, fingerprint: dict, keep: int = 3,
               best_metric: str | None = None, best_mode: str = 'min', async_save: bool = True,
               lenient: tuple[str, ...] = ()):
    if keep < 1:
      raise ValueError(f'Checkpointer: keep={keep} must be >= 1.')
    if best_mode not in ('min', 'max'):
      raise ValueError(f"Checkpointer: best_mode={best_mode!r}; use 'min' or 'max'.")
    _quiet_orbax()
    self.directory = Path(directory).absolute()
    self.fingerprint = json.loads(json.dumps(fingerprint))
    self.keep, self.best_metric, self.best_mode = keep, best_metric, best_mode
    self.lenient = tuple(lenient)
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save, best_mode=best_mode,
        best_fn=_metric_getter(best_metric, best_mode) if best_metric else None,
        preservation_policy=retention_policy(keep, best_metric, best_mode))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  # Saving -----------------------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, metrics: dict | None = None, extra: dict | None = None) -> None:
    """Starts writing `state` as `step` (asynchronously); returns once the arrays are safe to overwrite.

    Steps that retention drops are deleted by orbax only after this step has committed, so a crash during the
    save still leaves the `keep` newest committed steps.
    """
    checksum = int(jax.device_get(tree_checksum(state)))
    meta = {'step': int(step), 'fingerprint': self.fingerprint, 'checksum': checksum,
            'metrics': {k: float(v) for k, v in (metrics or {}).items()}, **(extra or {})}
    self._manager.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)),
                       metrics=meta['metrics'] if self.best_metric else None, force=True)

  def best_step(self) -> int | None:
    """The step with the best `best_metric` among those kept (None without a best_metric or scores)."""
    if not self.best_metric:
      return None
    scored = {s: m[self.best_metric] for s in self.steps()
              if (m := self._manager.metrics(s)) and self.best_metric in m}
    if not scored:
      return None
    pick = min if self.best_mode == 'min' else max
    return pick(scored, key=lambda s: (scored[s], -s))

  def wait(self) -> None:
    """Blocks until every started save has committed (and the steps it retires are deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # Restoring --------------------------------------------------------------------------------------------------

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict] | None:
    """(state, meta) of the newest step that loads and verifies, or None if the directory is empty.

    abstract_state: ShapeDtypeStructs (with shardings) of the state, from jax.eval_shape.
    """
    steps = self.steps()
    if not steps:
      return None
    skipped = []
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # unreadable record: treat like damaged arrays
        skipped.append((step, f'its metadata is unreadable ({describe_error(e)})'))
        continue
      self._check_fingerprint(meta)
      try:
        state = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state
      except Exception as e:
        skipped.append((step, f'its arrays failed to load ({describe_error(e)})'))
        continue
      got = int(jax.device_get(tree_checksum(state)))
      if got != meta['checksum']:
        skipped.append((step, f'its checksum is {got:#010x}, the saved one {meta["checksum"]:#010x}'))
        continue
      for s, why in skipped:
        logging.warning('Checkpoint step %d in %s is damaged: %s. Falling back to step %d.', s, self.directory,
                        why, step)
      unreadable = []
      for s in self.steps():
        if s < step:
          try:
            self.read_meta(s)
          except Exception:  # an older step whose deletion a crash interrupted
            unreadable.append(s)
      self._set_aside([s for s, _ in skipped] + unreadable)
      return state, meta
    raise CheckpointError(f'no checkpoint in {self.directory} is usable: ' +
                          '; '.join(f'step {s}: {why}' for s, why in skipped) +
                          '. Move the directory aside to start afresh.')

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged steps to '<step>.damaged[-n]': kept for inspection, out of orbax's way, so the resumed
    run can write those step numbers again."""
    if not steps:
      return
    if jax.process_index() == 0:
      for s in steps:
        src = self.directory / str(s)
        if not src.exists():
          continue
        dst, n = self.directory / f'{s}.damaged', 1
        while dst.exists():
          dst, n = self.directory / f'{s}.damaged-{n}', n + 1
        src.rename(dst)
        logging.warning('Moved damaged checkpoint %s to %s.', src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('jaxcompress_checkpoint_set_aside')
    self._manager.reload()

  def _check_fingerprint(self, meta: dict) -> None:
    theirs = meta.get('fingerprint')
    if theirs == self.fingerprint:
      return
    strict = lambda f: {k: v for k, v in f.items() if k not in self.lenient} if isinstance(f, dict) else f
    diff = _first_difference(theirs, self.fingerprint)
    if strict(theirs) == strict(self.fingerprint):
      logging.warning('Resuming from %s although its run differs (%s), as forced.', self.directory, diff)
      return
    why = ''
    if any(d.startswith('run/') for d in _differences(theirs, self.fingerprint)):
      why = (' The seed and the data decide the batch order, the validation split and the token ids, so '
             'resuming would silently continue on other data. To resume anyway, set '
             'LoopConfig(force_resume=True) (--force_resume).')
    raise CheckpointError(f'{self.directory} holds checkpoints of a different run ({diff}).{why} Use another run '
                          'directory, or resume with the configuration that wrote these checkpoints.')


def describe_error(e: BaseException, limit: int = 400) -> str:
  """'Type: message' of a restore error, readable: TensorStore appends a JSON spec of the whole store
  ([tensorstore_spec=...]) that buries the reason, and some errors carry their text in args, not str()."""
  import re
  text = str(e)
  if not text or text.startswith('<bound method'):
    text = '; '.join(str(a) for a in e.args if not callable(a)) or repr(e)
  text = re.sub(r"\s*\[tensorstore_spec='.*?'\]", '', text, flags=re.S)
  text = re.sub(r'\s*\[source locations=.*?\]', '', text, flags=re.S)
  text = ' '.join(text.split())
  return f'{type(e).__name__}: {text[:limit]}{"..." if len(text) > limit else ""}'


def retention_policy(keep: int, best_metric: str | None, best_mode: str):
  """orbax preservation: the newest `keep` steps, plus the single best by `best_metric` when one is named."""
  from orbax.checkpoint import checkpoint_managers as cm
  policies = [cm.LatestN(n=keep)]
  if best_metric:
    policies.append(cm.BestN(get_metric_fn=_metric_getter(best_metric, best_mode), reverse=best_mode == 'min',
                             n=1, keep_checkpoints_without_metrics=False))
  return cm.AnyPreservationPolicy(policies)


def _metric_getter(name: str, mode: str):
  """metrics -> score; a step saved without the metric ranks worst (ties go to the newest step)."""
  worst = float('inf') if mode == 'min' else float('-inf')
  return lambda metrics: float((metrics or {}).get(name, worst))


def _differences(a: Any, b: Any, path: str = '') -> list[str]:
  """Every leaf where fingerprints a (the checkpoint's) and b (this run's) differ, as readable lines."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            for d in _differences(a.get(k), b.get(k), f'{path}/{k}' if path else k)]
  return [f'{path or "fingerprint"}: checkpoint has {a!r}, this run has {b!r}']


def _first_difference(a: Any, b: Any, limit: int = 4) -> str:
  found = _differences(a, b)
  return '; '.join(found[:limit]) + (f'; and {len(found) - limit} more' if len(found) > limit else '')


def fingerprint(model: Any, params: Any, opt_state: Any = None) -> dict:
  """What a checkpoint must match to be resumed: the model spec, every parameter's shape and kind, and the
  optimizer state's layout (another optimizer or clipping setting changes it)."""
  import hashlib

  from jaxcompress import core, provenance
  shapes = {p: [type(w).__name__, list(core.shape_of(w))] for p, w in core.flatten(params).items()}
  out = {'model': type(model).__name__, 'config': provenance.to_jsonable(model.config), 'params': shapes}
  if opt_state is not None:
    layout = str(jax.tree.structure(opt_state)) + str([(x.shape, str(x.dtype)) for x in jax.tree.leaves(opt_state)])
    out['optimizer_state'] = (f'{len(jax.tree.leaves(opt_state))} arrays, layout '
                              f'{hashlib.sha256(layout.encode()).hexdigest()[:12]}')
  return out
