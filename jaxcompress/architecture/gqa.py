"""Multi-head -> grouped-query / multi-query attention by mean-pooling key and value heads (Ainslie et al.,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", 2023).

Query head n reads key/value head n // (N / K) (as in transformers), so the K heads are pooled in consecutive
groups of K / G: new head g is the mean of old heads g K/G ... (g + 1) K/G - 1, and every query head keeps
reading the pool of the head it read before. The KV cache shrinks by K / G; a short up-training recovers the
quality lost.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.models import Model


def pool_heads(w: jnp.ndarray, kv_heads: int, target: int, head_dim: int) -> jnp.ndarray:
  """w: [..., kv_heads * head_dim] (a k/v kernel [in, K H] or bias [K H]) -> [..., target * head_dim]."""
  lead = w.shape[:-1]
  grouped = w.reshape(*lead, target, kv_heads // target, head_dim)
  return grouped.astype(jnp.float32).mean(axis=-2).astype(w.dtype).reshape(*lead, target * head_dim)


def convert_to_gqa(model: Model, params: dict, kv_heads: int) -> tuple[Model, dict]:
  """(spec, params) with every layer's key/value heads mean-pooled down to `kv_heads` (1: multi-query).

  The model must have `num_kv_heads` and `num_heads` (the Llama family); kv_heads must divide its current
  key/value head count. Dense k/v weights only (convert before compressing them).
  """
  c = model.config
  if not hasattr(c, 'num_kv_heads'):
    raise ValueError(f'convert_to_gqa: {type(model).__name__} has no num_kv_heads; only grouped-query families '
                     '(Llama, Mistral, Qwen2) can hold fewer key/value heads.')
  k = c.num_kv_heads
  if not isinstance(kv_heads, int) or kv_heads < 1 or k % kv_heads:
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    raise ValueError(f'convert_to_gqa: kv_heads={kv_heads} does not divide the {k} key/value heads (with '
                     f'{c.num_heads} query heads); choose one of {divisors}.')
  hd = c.dim_per_head
  out = dict(params)
  blocks = dict(params[model.block_path])
  for i, bp in blocks.items():
    attn = dict(bp['attn'])
    for name in ('k_proj', 'v_proj'):
      lin = dict(attn[name])
      for leaf in ('kernel', 'bias'):
        if leaf in lin and lin[leaf] is not None:
          if not isinstance(lin[leaf], (jax.Array, np.ndarray)):
            raise ValueError(f'convert_to_gqa: layers/{i}/attn/{name}/{leaf} is a {type(lin[leaf]).__name__} '
                             'leaf; convert the dense checkpoint, then compress.')
          lin[leaf] = pool_heads(jnp.asarray(lin[leaf]), k, kv_heads, hd)
      attn[name] = lin
    blocks[i] = {**bp, 'attn': attn}
  out[model.block_path] = blocks
  return type(model)(dataclasses.replace(c, num_kv_heads=kv_heads, head_dim=hd)), out


def kv_cache_bytes(model: Model, params: dict, batch: int, max_len: int, dtype=jnp.bfloat16) -> int:
  """Bytes of the decoding KV cache for `batch` sequences of `max_len`, read from the k_proj widths."""
  total = 0
  for i in range(model.num_layers(params)):
    width = core.shape_of(model.block_params(params, i)['attn']['k_proj']['kernel'])[1]
    total += 2 * batch * max_len * width * jnp.dtype(dtype).itemsize
  return total
