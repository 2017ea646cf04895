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


FIELDS = {  # what each batch field holds, for the messages of `require`
    'inputs': 'inputs [B, T] int32 token ids',
    'targets': 'targets [B, T] int32 (the next token of each input position)',
    'labels': 'labels [B] int32 class ids',
    'attention_mask': 'attention_mask [B, T] (1 real token, 0 padding)',
}


def require(batch: dict, keys: tuple[str, ...], objective: str) -> None:
  """ValueError naming the fields `objective` reads that the batch lacks, and the fields it has (shapes are
  static, so this runs once, when the step is traced)."""
  missing = [k for k in keys if k not in batch]
  if missing:
    have = {k: tuple(getattr(v, 'shape', ())) for k, v in batch.items()}
    hint = ' (LMBatches.batch gives inputs, targets and mask)' if 'targets' in missing else ''
    raise ValueError(f'{objective}: the batch lacks {missing}; it has {have}. This objective reads '
                     f"{', '.join(FIELDS.get(k, k) for k in keys)}{hint}.")


def token_mask(batch: dict) -> jax.Array:
  """batch['mask'] [B, T] as float32 (1 where a target counts), or ones like batch['targets']."""
  require(batch, ('targets',), 'token_mask')
  targets = batch['targets'].shape
  if 'mask' in batch and tuple(batch['mask'].shape) != tuple(targets):
    raise ValueError(f"batch['mask'] has shape {tuple(batch['mask'].shape)} but batch['targets'] has "
                     f'{tuple(targets)}; they must match (one weight per target: 1 where it counts, 0 for padding).')
  return batch.get('mask', jnp.ones(targets, jnp.float32)).astype(jnp.float32)


def causal_lm(model: Model, *, remat: bool = False, scan: bool = False) -> Objective:
  """Next-token cross-entropy, summed over masked tokens. remat/scan: see `Model.apply`."""

  def objective(params, frozen, batch, rng):
    del frozen, rng
    require(batch, ('inputs', 'targets'), 'causal_lm')
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
    require(batch, ('inputs', 'labels'), 'classification')
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
