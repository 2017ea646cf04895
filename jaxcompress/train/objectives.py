"""Training objectives: pure functions the step differentiates.

An objective is called as objective(params, frozen, batch, rng) and returns (loss_sum, (weight, metric_sums)):
sums over the examples or tokens of one micro-batch, and the weight (how many were summed). The step adds
these over micro-batches and divides once, so gradient accumulation gives the gradient of the whole batch.

Batches are dicts of arrays:
  causal LM:       inputs [B, T] int32, targets [B, T] int32, mask [B, T] (1 where a target counts)
  classification:  inputs [B, T] int32, labels [B] int32, optional attention_mask [B, T]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.models import Model

Objective = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]
CLASSIFIER = 'classifier'


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [..., V], targets [...] int -> per-token negative log-likelihood in float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _mask(batch: dict) -> jax.Array:
  return batch.get('mask', jnp.ones(batch['targets'].shape, jnp.float32)).astype(jnp.float32)


def causal_lm(model: Model, *, remat: bool = False, scan: bool = False) -> Objective:
  """Next-token cross-entropy, summed over masked tokens. remat/scan: see `Model.apply`."""

  def objective(params, frozen, batch, rng):
    del frozen, rng
    logits = model.apply(params, batch['inputs'], remat=remat, scan=scan)
    mask = _mask(batch)
    nll = token_cross_entropy(logits, batch['targets']) * mask
    correct = (jnp.argmax(logits, -1) == batch['targets']) * mask
    return nll.sum(), (mask.sum(), {'nll': nll.sum(), 'accuracy': correct.sum()})

  return objective


def distillation(student: Model, teacher: Model, *, alpha: float = 0.5, temperature: float = 2.0,
                 remat: bool = False) -> Objective:
  """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets).

  The teacher's params come in as `frozen` and run in the same step under stop_gradient.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'distillation: alpha={alpha} must lie in [0, 1].')
  if temperature <= 0:
    raise ValueError(f'distillation: temperature={temperature} must be positive.')

  def objective(params, frozen, batch, rng):
    del rng
    if frozen is None:
      raise ValueError('distillation needs the teacher params as TrainState.frozen.')
    logits = student.apply(params, batch['inputs'], remat=remat).astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher.apply(frozen, batch['inputs']).astype(jnp.float32))
    if teacher_logits.shape != logits.shape:
      raise ValueError(f'distillation: teacher logits {teacher_logits.shape} and student logits {logits.shape} '
                       'differ; student and teacher must share the vocabulary.')
    mask = _mask(batch)
    t = temperature
    p_teacher = jax.nn.softmax(teacher_logits / t, -1)
    kl = jnp.sum(p_teacher * (jax.nn.log_softmax(teacher_logits / t, -1) - jax.nn.log_softmax(logits / t, -1)), -1)
    nll = token_cross_entropy(logits, batch['targets'])
    loss = (alpha * t * t * kl + (1 - alpha) * nll) * mask
    return loss.sum(), (mask.sum(), {'kl': (kl * mask).sum(), 'nll': (nll * mask).sum()})

  return objective


def add_classifier(params: dict, num_classes: int, key: jax.Array, hidden_size: int) -> dict:
  """params with a linear classifier head ({'kernel': [d, C], 'bias': [C]}) under 'classifier'."""
  kernel = 0.02 * jax.random.normal(key, (hidden_size, num_classes), jnp.float32)
  return {**params, CLASSIFIER: {'kernel': kernel, 'bias': jnp.zeros((num_classes,), jnp.float32)}}


def classification(model: Model, *, pool: str = 'cls', remat: bool = False) -> Objective:
  """Cross-entropy of a linear head over pooled hidden states ('cls': first token, 'mean', 'last')."""
  if pool not in ('cls', 'mean', 'last'):
    raise ValueError(f"classification: pool={pool!r}; use 'cls', 'mean' or 'last'.")
  from jaxcompress.core import linear

  def objective(params, frozen, batch, rng):
    del frozen, rng
    if CLASSIFIER not in params:
      raise ValueError("classification needs params['classifier']; add one with objectives.add_classifier.")
    body = {k: v for k, v in params.items() if k != CLASSIFIER}
    mask = batch.get('attention_mask')
    h = model.hidden_states(body, batch['inputs'], attention_mask=mask)
    if pool == 'cls':
      feats = h[:, 0]
    elif pool == 'last':
      feats = h[:, -1]
    else:
      m = jnp.ones(h.shape[:2], h.dtype) if mask is None else mask.astype(h.dtype)
      feats = (h * m[..., None]).sum(1) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
    logits = linear(feats, params[CLASSIFIER]['kernel'], params[CLASSIFIER]['bias'])
    nll = token_cross_entropy(logits, batch['labels'])
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    n = jnp.asarray(batch['labels'].shape[0], jnp.float32)
    return nll.sum(), (n, {'nll': nll.sum(), 'accuracy': correct.sum()})

  return objective
