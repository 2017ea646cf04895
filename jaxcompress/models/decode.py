"""Autoregressive decoding with a KV cache, compiled end to end (prefill + a scan over new tokens).

    tokens = generate(model, params, prompt, max_new_tokens=32)                           # greedy
    tokens = generate(model, params, prompt, max_new_tokens=32, temperature=0.8, top_k=40,
                      key=jax.random.key(0))                                              # sampling
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.models import layers
from jaxcompress.models.base import Model, Params


def init_cache(model: Model, params: Params, batch: int, max_len: int, dtype=jnp.float32) -> list[dict]:
  """Per-layer {'k', 'v': [batch, max_len, kv_heads, head_dim]} zeros, sized from each layer's weights."""
  module = model.bind(params)
  return [blk.init_cache(batch, max_len, dtype) for blk in getattr(module, model.block_path)]


def forward_cached(model: Model, params: Params, tokens: jax.Array, cache: list[dict], index: jax.Array
                   ) -> tuple[jax.Array, list[dict]]:
  """tokens: [B, T] at positions index..index+T-1 -> (logits [B, T, V], updated cache)."""
  b, t = tokens.shape
  max_len = cache[0]['k'].shape[1]
  positions = index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  mask = layers.attention_mask(positions, max_len, causal=True, window=model._window())
  ctx = layers.Context(positions=positions, mask=mask, cache_index=index)
  module = model.bind(params)
  h = module.embed(tokens, positions, None)
  new_cache = []
  for blk, c in zip(getattr(module, model.block_path), cache):
    h, c = blk(h, ctx, c)
    new_cache.append(c)
  return module.head(h), new_cache


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int | None) -> jax.Array:
  """logits: [B, V] -> token ids [B]; temperature 0 is greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: Model, params: Params, prompt: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, key: jax.Array | None = None,
             cache_dtype=None) -> jax.Array:
  """prompt: [B, T] int (all rows full length) -> [B, T + max_new_tokens] int32.

  Greedy when temperature is 0; otherwise samples with `key` (required), so a fixed key gives fixed text.
  """
  if not model.causal:
    raise ValueError(f'generate needs a causal LM; {type(model).__name__} is an encoder.')
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(f'generate: prompt must be int [batch, seq], got {prompt.dtype} {prompt.shape}.')
  if max_new_tokens < 1:
    raise ValueError(f'generate: max_new_tokens={max_new_tokens}; ask for at least 1.')
  if temperature < 0:
    raise ValueError(f'generate: temperature={temperature} must be >= 0 (0 is greedy).')
  if temperature > 0 and key is None:
    raise ValueError('generate: sampling (temperature > 0) needs key=jax.random.key(seed).')
  limit = model.max_positions()
  if limit is not None and prompt.shape[1] + max_new_tokens > limit:
    raise ValueError(f'generate: {prompt.shape[1]} + {max_new_tokens} tokens exceed the {limit} learned '
                     'positions of this model.')
  key = jax.random.key(0) if key is None else key
  return _generate(model, core.resolve(params), prompt.astype(jnp.int32), key, max_new_tokens,
                   float(temperature), top_k, cache_dtype)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(model, params, prompt, key, max_new_tokens, temperature, top_k, cache_dtype):
  b, t = prompt.shape
  dtype = cache_dtype or next(x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
  cache = init_cache(model, params, b, t + max_new_tokens, dtype)
  logits, cache = forward_cached(model, params, prompt, cache, jnp.int32(0))
  keys = jax.random.split(key, max_new_tokens)
  first = sample_logits(logits[:, -1], keys[0], temperature, top_k)

  def step(carry, k):
    tok, cache, index = carry
    logits, cache = forward_cached(model, params, tok[:, None], cache, index)
    nxt = sample_logits(logits[:, -1], k, temperature, top_k)
    return (nxt, cache, index + 1), tok

  (last, _, _), toks = jax.lax.scan(step, (first, cache, jnp.int32(t)), keys[1:])
  new = jnp.concatenate([toks.T, last[:, None]], axis=1)
  return jnp.concatenate([prompt, new], axis=1)
