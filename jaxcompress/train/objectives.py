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

from jaxcompress.eval import token_nll
from jaxcompress.models import Model

Objective = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, tuple[jax.Array, dict]]]
CLASSIFIER = 'classifier'


def token_mask(batch: dict) -> jax.Array:
  """batch['mask'] [B, T] as float32 (1 where a target counts), or ones like batch['targets']."""
  return batch.get('mask', jnp.ones(batch['targets'].shape, jnp.float32)).astype(jnp.float32)


def causal_lm(model: Model, *, remat: bool = False, scan: bool = False) -> Objective:
  """Next-token cross-entropy, summed over masked tokens. remat/scan: see `Model.apply`."""

  def objective(params, frozen, batch, rng):
    del frozen, rng
    logits = model.apply(params, batch['inputs'], remat=remat, scan=scan)
    mask = token_mask(batch)
    nll = token_nll(logits, batch['targets']) * mask
    correct = (jnp.argmax(logits, -1) == batch['targets']) * mask
    return nll.sum(), (mask.sum(), {'nll': nll.sum(), 'accuracy': correct.sum()})

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
    nll = token_nll(logits, batch['labels'])
    correct = (jnp.argmax(logits, -1) == batch['labels']).astype(jnp.float32)
    n = jnp.asarray(batch['labels'].shape[0], jnp.float32)
    return nll.sum(), (n, {'nll': nll.sum(), 'accuracy': correct.sum()})

  return objective
