"""Autoregressive decoding with a KV cache, compiled end to end (prefill + a scan over new tokens).

    tokens = generate(model, params, prompt, max_new_tokens=32)                           # greedy
    tokens = generate(model, params, prompt, max_new_tokens=32, temperature=0.8, top_k=40,
                      key=jax.random.key(0))                                              # sampling
    tokens = generate(model, params, prompt, attention_mask=mask, max_new_tokens=32)      # left-padded batch

A left-padded batch follows transformers: each row's positions count its real tokens only (the cumulative sum of
the mask), and its pad slots in the KV cache are masked for the prompt and for every generated step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.models import layers
import numpy as np

from jaxcompress.models.base import Model, Params, _check_tokens


def init_cache(model: Model, params: Params, batch: int, max_len: int, dtype=jnp.float32) -> list[dict]:
  """Per-layer {'k', 'v': [batch, max_len, kv_heads, head_dim]} zeros, sized from each layer's weights."""
  module = model.bind(params)
  return [blk.init_cache(batch, max_len, dtype) for blk in getattr(module, model.block_path)]


def forward_cached(model: Model, params: Params, tokens: jax.Array, cache: list[dict], index: jax.Array, *,
                   positions: jax.Array | None = None, key_valid: jax.Array | None = None
                   ) -> tuple[jax.Array, list[dict]]:
  """tokens: [B, T] written at cache slots index..index+T-1 -> (logits [B, T, V], updated cache).

  positions: [B, T] int32 positions of the tokens (default: their slots; smaller in left-padded rows).
  key_valid: [B, S] bool over the cache's S slots, False where a slot holds padding.
  Causality and the sliding window count cache slots, as transformers' masks do.
  """
  b, t = tokens.shape
  max_len = cache[0]['k'].shape[1]
  slots = index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  positions = slots if positions is None else positions
  mask = layers.attention_mask(slots, max_len, causal=True, key_valid=key_valid, window=model._window())
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
             attention_mask: jax.Array | None = None, temperature: float = 0.0, top_k: int | None = None,
             key: jax.Array | None = None, cache_dtype=None) -> jax.Array:
  """prompt: [B, T] int -> [B, T + max_new_tokens] int32 (the prompt, then the new tokens).

  attention_mask: [B, T], 1 for real tokens and 0 for padding; prompts of different lengths are padded on the
    left (every row's last token is real). None: every row is full length.
  Greedy when temperature is 0; otherwise samples with `key` (required), so a fixed key gives fixed text.
  Token ids are checked to lie in [0, vocab_size) on the host.
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
  attention_mask = None if attention_mask is None else jnp.asarray(attention_mask)
  try:
    _check_tokens(prompt, attention_mask, model)
  except ValueError as e:
    raise ValueError(f'generate: {e}') from None
  if attention_mask is None:
    attention_mask = jnp.ones(prompt.shape, jnp.int32)
  else:
    _check_left_padding(attention_mask)
  key = jax.random.key(0) if key is None else key
  return _generate(model, core.resolve(params), prompt.astype(jnp.int32), attention_mask.astype(jnp.int32), key,
                   max_new_tokens, float(temperature), top_k, cache_dtype)


def _check_left_padding(mask) -> None:
  if isinstance(mask, jax.core.Tracer):
    return
  m = np.asarray(mask)
  if not np.isin(m, (0, 1)).all():
    raise ValueError(f'generate: attention_mask must hold 0 (padding) and 1 (real token), got values '
                     f'{sorted(set(np.unique(m).tolist()) - {0, 1})[:5]}.')
  bad = np.nonzero((np.diff(m, axis=1) < 0).any(axis=1) | (m[:, -1] == 0))[0]
  if bad.size:
    raise ValueError(f'generate: attention_mask row {int(bad[0])} is {m[bad[0]].tolist()}: prompts must be padded '
                     'on the left (zeros first, then ones, the last token real) and hold at least one token.')


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _generate(model, params, prompt, prompt_mask, key, max_new_tokens, temperature, top_k, cache_dtype):
  b, t = prompt.shape
  dtype = cache_dtype or next(x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
  cache = init_cache(model, params, b, t + max_new_tokens, dtype)
  # Pad slots stay masked for every step; positions count real tokens only (pads get 1, as in transformers).
  key_valid = jnp.concatenate([prompt_mask.astype(bool), jnp.ones((b, max_new_tokens), bool)], axis=1)
  positions = jnp.where(prompt_mask > 0, jnp.cumsum(prompt_mask, axis=1) - 1, 1).astype(jnp.int32)
  logits, cache = forward_cached(model, params, prompt, cache, jnp.int32(0), positions=positions,
                                 key_valid=key_valid)
  keys = jax.random.split(key, max_new_tokens)
  first = sample_logits(logits[:, -1], keys[0], temperature, top_k)

  def step(carry, k):
    tok, cache, index, pos = carry
    logits, cache = forward_cached(model, params, tok[:, None], cache, index, positions=pos[:, None],
                                   key_valid=key_valid)
    nxt = sample_logits(logits[:, -1], k, temperature, top_k)
    return (nxt, cache, index + 1, pos + 1), tok

  lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
  (last, *_), toks = jax.lax.scan(step, (first, cache, jnp.int32(t), lengths), keys[1:])
  new = jnp.concatenate([toks.T, last[:, None]], axis=1)
  return jnp.concatenate([prompt, new], axis=1)
