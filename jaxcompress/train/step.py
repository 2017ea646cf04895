"""The jit-compiled training step every family uses.

    step = make_train_step(objective, optimizer, compute_dtype=jnp.bfloat16, accum_steps=4)
    state, metrics = step(state, batch)

One step: split the batch into `accum_steps` micro-batches; for each, cast the float32 master weights to the
compute dtype, apply the transforms' forward, and take the gradient of the objective's summed loss with respect
to the trainable arrays; add them up, divide by the total weight, update with optax, then run the transforms'
update (`transforms.Transform`). A step whose loss, gradient, updated parameters, optimizer state or transform
state is not finite leaves the state unchanged (transform state included) and reports `finite = 0`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.models import ids, layers
from jaxcompress.train import state as state_lib
from jaxcompress.train import transforms as transforms_lib
from jaxcompress.train.objectives import Objective
from jaxcompress.train.state import TrainState

StepFn = Callable[[TrainState, dict], tuple[TrainState, dict]]


def split_microbatches(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [accum, B // accum, ...], micro-batch a taking rows a, a + accum, ... .

  Interleaving keeps each device's rows spread evenly over micro-batches when the batch is sharded.
  """
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f'batch of {x.shape[0]} rows does not split into accum_steps={accum_steps} '
                       'micro-batches; make the batch size a multiple of accum_steps.')
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


INTEGER_FIELDS = ('inputs', 'targets', 'labels')
# 0/1 fields, each with the field whose shape it must have and what one of its entries says counts.
MASK_FIELDS = {'mask': ('targets', 'target'), 'attention_mask': ('inputs', 'token')}


def validate_batch(batch: dict, *, rows: int, vocab_size: int | None = None) -> None:
  """Host-side check of one process's batch before it reaches the compiled step: clear errors, not XLA's
  (and not the silent NaNs an out-of-range token id gives inside jit).

  Errors: a field without `rows` rows; float token ids or labels (refused, never cast); token ids outside
  [0, vocab_size) (`models.ids.check_ids`, one min/max per field); inputs and targets, mask and targets, or
  attention_mask and inputs of different shapes; a mask or attention_mask that is zero everywhere (the step
  would train on nothing: loss 0.0 and a zero gradient, while weight decay still moves the weights).
  Warning (`warnings.warn`, RuntimeWarning): rows whose mask is all zero, which add nothing to the loss (padding
  rows are allowed; a batch of nothing but padding is not).
  """
  if not isinstance(batch, dict) or not batch:
    raise ValueError(f'a batch must be a non-empty dict of arrays, got {type(batch).__name__}.')
  for name, x in batch.items():
    shape = np.shape(x)
    if not shape or shape[0] != rows:
      raise ValueError(f"batch['{name}'] has shape {tuple(shape)}; expected {rows} rows (the global batch size "
                       'divided by the process count) in the first dimension.')
    if name in INTEGER_FIELDS:
      ids.check_integer(x, name=f"batch['{name}']")
  if vocab_size is not None:
    for name in ('inputs', 'targets'):
      if name in batch:
        ids.check_ids(batch[name], vocab_size, name=f"batch['{name}']")
  if 'inputs' in batch and 'targets' in batch and np.shape(batch['inputs']) != np.shape(batch['targets']):
    raise ValueError(f"batch['inputs'] {np.shape(batch['inputs'])} and batch['targets'] "
                     f"{np.shape(batch['targets'])} must have the same shape.")
  for name, (like, unit) in MASK_FIELDS.items():
    if name in batch:
      _check_mask(name, np.asarray(batch[name]), like, np.shape(batch[like]) if like in batch else None, unit)


def _check_mask(name: str, m: np.ndarray, like: str, shape: tuple | None, unit: str) -> None:
  """A 0/1 mask: the shape of batch[like], not zero everywhere; a warning for rows that are all zero."""
  if shape is not None and m.shape != tuple(shape):
    raise ValueError(f"batch['{name}'] has shape {m.shape} but batch['{like}'] has {tuple(shape)}; they must "
                     f'match (one 1/0 per {unit}: 1 where it counts, 0 for padding).')
  live = np.any(m.reshape(m.shape[0], -1) != 0, axis=1)
  if not live.any():
    raise ValueError(f"batch['{name}'] is zero everywhere: no {unit} of this batch counts, so the step would train "
                     'on nothing (loss 0.0, a zero gradient, while weight decay still moves the weights). Give '
                     f'each row at least one 1 in {name}, or leave such batches out of the data.')
  if not live.all():
    warnings.warn(f"batch['{name}'] has {int(np.sum(~live))} of {m.shape[0]} rows that are all zero; those rows "
                  'add nothing to the loss or the gradient. Fill batches with real rows to train on them.',
                  RuntimeWarning, stacklevel=3)


def all_finite(tree: Any) -> jax.Array:
  """bool scalar: every floating array of `tree` holds only finite values (integer and bool arrays are)."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, *,
                    compute_dtype: Any = jnp.float32, accum_steps: int = 1,
                    transforms: transforms_lib.Transform | Sequence[transforms_lib.Transform] = (),
                    trainable: state_lib.Trainable = state_lib.floating,
                    activation_sharding: Any = None) -> StepFn:
  """The (un-jitted) step function; `compile_step` jits it with shardings and buffer donation.

  activation_sharding: a NamedSharding over the batch axes that the models pin hidden states and logits to
  (`sharding.batch_sharding(mesh)`); None leaves activation placement to the partitioner.
  transforms: a `transforms.Transform` or a sequence of them (chained); the state must come from
  `state.init_state(..., transforms=)` with the same transforms.
  """
  if accum_steps < 1:
    raise ValueError(f'accum_steps={accum_steps} must be >= 1.')
  transform = transforms_lib.as_transform(transforms)

  def micro_grads(trained, fixed, frozen, transform_state, micro, rng):
    def loss_fn(trained):
      params = state_lib.cast_floating(state_lib.combine(trained, fixed), compute_dtype)
      params = transform.forward(params, transform_state)
      with layers.activation_sharding(activation_sharding):
        return objective(params, state_lib.cast_floating(frozen, compute_dtype), micro, rng)
    (loss, (weight, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trained)
    return grads, loss, weight, metrics

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    trained, fixed = state_lib.partition(state.params, trainable)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    micro = split_microbatches(batch, accum_steps)

    def body(carry, xs):
      grads, loss, weight, metrics = carry
      mb, i = xs
      g, l, w, m = micro_grads(trained, fixed, state.frozen, state.transform_state, mb, jax.random.fold_in(rng, i))
      add = lambda a, b: jax.tree.map(jnp.add, a, b)
      return (add(grads, g), loss + l, weight + w, add(metrics, m)), None

    if accum_steps == 1:  # no loop: a one-trip scan would add zeroed gradient buffers and a sum over them
      grads, loss, weight, metrics = micro_grads(trained, fixed, state.frozen, state.transform_state, batch,
                                                 jax.random.fold_in(rng, 0))
      loss, weight = loss.astype(jnp.float32), weight.astype(jnp.float32)
      metrics = jax.tree.map(lambda m: m.astype(jnp.float32), metrics)
    else:
      zero_grads = jax.tree.map(jnp.zeros_like, trained)
      first = jax.tree.map(lambda x: x[0], micro)
      metric_shapes = jax.eval_shape(
          lambda: micro_grads(trained, fixed, state.frozen, state.transform_state, first, rng)[3])
      zeros = (zero_grads, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
               jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes))
      (grads, loss, weight, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))

    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    loss = loss / weight
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update():
      updates, opt_state = optimizer.update(grads, state.opt_state, trained)
      params = state_lib.combine(optax.apply_updates(trained, updates), fixed)
      params, transform_state = transform.update(params, state.transform_state, state.step + 1,
                                                 transforms_lib.transform_key(rng))
      return params, opt_state, transform_state

    # A finite loss and gradient can still overflow the update (a huge learning rate): the new parameters and
    # optimizer state must be finite too, or the step is refused, so no checkpoint ever holds inf or NaN.
    new = update()
    finite = finite & all_finite(new)
    # A per-array select fuses into the update's loops; a lax.cond would copy every output buffer.
    keep = lambda a, b: jnp.where(finite, a, b) if _selectable(a) else jax.lax.cond(finite, lambda: a, lambda: b)
    params, opt_state = jax.tree.map(keep, new[:2], (state.params, state.opt_state))
    transform_state = jax.lax.cond(finite, lambda: new[2], lambda: state.transform_state)
    new_state = state.replace(step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state,
                              transform_state=transform_state)
    out = {'loss': loss, 'grad_norm': grad_norm, 'weight': weight, 'finite': finite.astype(jnp.float32),
           **{k: v / weight for k, v in metrics.items()}}
    return new_state, out

  return step


def _selectable(x) -> bool:
  """An array `jnp.where` can select (not a typed PRNG key or another extended dtype)."""
  return hasattr(x, 'dtype') and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)


def compile_step(step: StepFn, *, state_sharding: Any = None, batch_sharding: Any = None,
                 donate: bool = True) -> StepFn:
  """jax.jit with optional input/output shardings; the old state's buffers are donated to the new one."""
  kwargs = {}
  if state_sharding is not None:
    kwargs = dict(in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, None))
  return jax.jit(step, donate_argnums=(0,) if donate else (), **kwargs)
