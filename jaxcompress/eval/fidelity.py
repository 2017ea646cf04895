"""How far a compressed model's outputs drift from its reference on the same inputs.

Perplexity says how well a model predicts text; fidelity says how much compression changed it, token by
token, without any labels:

    KL     = mean_t  sum_v p_ref(v | t) (log p_ref(v | t) - log p(v | t))
    top-1  = mean_t  [argmax_v ref_logits_t == argmax_v logits_t]
    cosine = <e_ref, e> / (|e_ref| |e|) per embedding row

Every function is pure jnp and jittable; softmaxes and reductions run in float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress.models import ids
from jaxcompress.models.base import Model, Params


def _check_same_shape(fn: str, ref: jax.Array, other: jax.Array) -> None:
  if ref.shape != other.shape:
    raise ValueError(f'{fn}: reference shape {ref.shape} and compared shape {other.shape} differ; '
                     'run both models on the same tokens (and the same vocabulary).')


def _token_weights(shape: tuple[int, ...], mask: jax.Array | None) -> jax.Array:
  """mask: [...] bool or {0, 1} over token positions (None: all) -> float32 weights of `shape`."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  if tuple(mask.shape) != tuple(shape):
    raise ValueError(f'mask shape {tuple(mask.shape)} must equal the token shape {tuple(shape)} '
                     '(the logits shape without the vocabulary axis).')
  return mask.astype(bool).astype(jnp.float32)


def _masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of `values` over positions with weight 1; 0 when no position is selected."""
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def token_kl(ref_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """KL(p_ref || p) per token. ref_logits, logits: [..., V] -> [...] float32 (nats, >= 0)."""
  _check_same_shape('token_kl', ref_logits, logits)
  logp_ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p_ref = jnp.exp(logp_ref)
  # Classes the reference rules out (p_ref = 0, e.g. -inf logits) contribute 0, not 0 * inf.
  return jnp.sum(jnp.where(p_ref > 0, p_ref * (logp_ref - logp), 0.0), axis=-1)


def logit_kl(ref_logits: jax.Array, logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over tokens of KL(p_ref || p). ref_logits, logits: [..., V]; mask: [...] -> scalar float32."""
  _check_same_shape('logit_kl', ref_logits, logits)
  kl = token_kl(ref_logits, logits)
  return _masked_mean(kl, _token_weights(kl.shape, mask))


def top1_agreement(ref_logits: jax.Array, logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Fraction of tokens whose argmax matches. ref_logits, logits: [..., V]; mask: [...] -> scalar float32."""
  _check_same_shape('top1_agreement', ref_logits, logits)
  same = (jnp.argmax(ref_logits, axis=-1) == jnp.argmax(logits, axis=-1)).astype(jnp.float32)
  return _masked_mean(same, _token_weights(same.shape, mask))


def relative_error(ref: jax.Array, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """||x - ref|| / ||ref|| (Frobenius, float32) over the selected rows. ref, x: [..., D]; mask: [...]."""
  _check_same_shape('relative_error', ref, x)
  ref32, x32 = ref.astype(jnp.float32), x.astype(jnp.float32)
  w = _token_weights(ref.shape[:-1], mask)[..., None]
  num = jnp.sum(w * jnp.square(x32 - ref32))
  den = jnp.sum(w * jnp.square(ref32))
  return jnp.sqrt(num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny))


class CosineSimilarity(NamedTuple):
  """Per-row cosine similarity of two embedding sets and its summaries (all float32)."""

  per_row: jax.Array  # [...]
  mean: jax.Array  # scalar
  min: jax.Array  # scalar


def embedding_cosine(ref_emb: jax.Array, emb: jax.Array, eps: float = 1e-12) -> CosineSimilarity:
  """Cosine similarity row by row. ref_emb, emb: [..., D] -> CosineSimilarity (per_row: [...])."""
  _check_same_shape('embedding_cosine', ref_emb, emb)
  a, b = ref_emb.astype(jnp.float32), emb.astype(jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  cos = jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)
  return CosineSimilarity(per_row=cos, mean=jnp.mean(cos), min=jnp.min(cos))


def compare_lm(model_ref: Model, params_ref: Params, model: Model, params: Params, tokens: jax.Array, *,
               attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Runs both language models on the same tokens and compares their output distributions (jitted; the
  model specs are static).

  tokens: [B, T] int; attention_mask: [B, T] (1 for real tokens; padded positions are left out of every
  metric) -> {'kl': mean KL(p_ref || p), 'top1': argmax agreement, 'rel_logit_error': ||dz|| / ||z_ref||},
  float32 scalars. Token ids are checked against both vocabularies on the host first (inside the jit an invalid
  id would give NaN figures).
  """
  for m in (model_ref, model):
    ids.check_tokens(m, tokens, where='compare_lm: ')
  return _compare_lm(model_ref, params_ref, model, params, tokens, attention_mask=attention_mask)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _compare_lm(model_ref: Model, params_ref: Params, model: Model, params: Params, tokens: jax.Array, *,
                attention_mask: jax.Array | None = None) -> dict[str, jax.Array]:
  ref_logits = model_ref.apply(params_ref, tokens, attention_mask=attention_mask)
  logits = model.apply(params, tokens, attention_mask=attention_mask)
  return {'kl': logit_kl(ref_logits, logits, attention_mask),
          'top1': top1_agreement(ref_logits, logits, attention_mask),
          'rel_logit_error': relative_error(ref_logits, logits, attention_mask)}
