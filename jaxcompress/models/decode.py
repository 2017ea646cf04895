"""Autoregressive decoding with a KV cache, compiled end to end (prefill + a scan over new tokens).

    tokens = generate(model, params, prompt, max_new_tokens=32)                           # greedy
    tokens = generate(model, params, prompt, max_new_tokens=32, temperature=0.8, top_k=40,
                      key=jax.random.key(0))                                              # sampling
    tokens = generate(model, params, prompt, attention_mask=mask, max_new_tokens=32)      # left-padded batch

    tokens = generate(model, params, prompt, max_new_tokens=32,
                      kv_cache=KVCacheFormat(bits=4, group_size=32, residual=32))                 # KIVI int4 cache

A left-padded batch follows transformers: each row's positions count its real tokens only (the cumulative sum of
the mask), and its pad slots in the KV cache are masked for the prompt and for every generated step.

Quantized KV cache (KIVI, Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024).
Each group X of G numbers is stored as b-bit codes on its own min-max grid,

    z = min X,  s = (max X - min X) / (2^b - 1),  Q(X) = clamp(round((X - z) / s), 0, 2^b - 1),  X' = Q(X) s + z,

keys per channel (a group: G consecutive tokens of one head-dim channel, since key outliers sit in fixed
channels) and values per token (a group: G consecutive channels of one token). The newest tokens stay in full
precision: values of the last R tokens; keys of the tokens after the last multiple of max(R, G) (KIVI's
Algorithm 1: keys are quantized R tokens at a time, when that many have gathered). Each number is quantized once,
after the step that wrote it has attended to it in full precision, as in the authors' code. `KVCacheFormat` picks
the format; `generate(kv_cache=...)` and `init_cache(kv_cache=...)` take it, and a model whose config holds
`kv_cache` (the `kivi` recipe stage sets it) uses that one by default. Stored: codes (4 and 2 bits packed 2 and 4
per byte along the head dim), a float16 scale and minimum per group (as in the authors' code), and the
full-precision window in the cache dtype; `cache_bytes` counts exactly these. Attention reads one step's
dequantized keys and values (a transient [batch, max_len, kv_heads, head_dim] buffer per layer, as a kernel that
dequantizes tiles would), so outputs are those of the quantized cache; speed is not the point of this path.
Pad slots of a left-padded batch are quantized with their row's real tokens (as in the authors' code).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.models import layers
from jaxcompress.models.base import Model, Params, _check_tokens

KV_BITS = (8, 4, 2)
FULL = 'full'  # kv_cache=FULL: a full-precision cache even when the model's config names a quantized one


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVCacheFormat:
  """A KIVI-quantized KV cache (see the module docstring); checked when built."""

  bits: int = 4  # code bits of keys and values: 8, 4 or 2
  group_size: int = 32  # tokens per key group (per channel) and channels per value group (per token)
  residual: int = 32  # newest tokens kept in full precision (R); a multiple of group_size, 0 for none

  def __post_init__(self):
    if not isinstance(self.bits, int) or self.bits not in KV_BITS:
      raise ValueError(f'kv_cache: bits={self.bits!r} is not supported; use one of {KV_BITS}.')
    if not isinstance(self.group_size, int) or self.group_size < 1:
      raise ValueError(f'kv_cache: group_size={self.group_size!r} must be a positive int (32 or 128 are usual).')
    if not isinstance(self.residual, int) or self.residual < 0:
      raise ValueError(f'kv_cache: residual={self.residual!r} must be an int >= 0 (0 keeps no token in full '
                       'precision).')
    if self.residual % self.group_size:
      raise ValueError(f'kv_cache: residual={self.residual} is not a multiple of group_size={self.group_size} '
                       '(keys are quantized in whole groups of tokens); use residual='
                       f'{self.residual // self.group_size * self.group_size} or '
                       f'{-(-self.residual // self.group_size) * self.group_size}.')

  @property
  def key_chunk(self) -> int:
    """Keys are quantized this many tokens at a time: max(R, G)."""
    return max(self.residual, self.group_size)

  def check_head_dim(self, head_dim: int) -> None:
    """A ValueError unless values' groups and packed codes tile a head of `head_dim` channels."""
    if head_dim % self.group_size:
      divisors = [d for d in range(1, head_dim + 1) if head_dim % d == 0]
      raise ValueError(f'kv_cache: group_size={self.group_size} does not divide head_dim={head_dim} (values are '
                       f'grouped along the head dim); choose one of {divisors}.')
    if head_dim % (8 // self.bits):
      raise ValueError(f'kv_cache: bits={self.bits} packs {8 // self.bits} codes per byte along the head dim, '
                       f'which head_dim={head_dim} does not fill; use bits=8.')

  def to_dict(self) -> dict[str, int]:
    return {'method': 'kivi', 'bits': self.bits, 'group_size': self.group_size, 'residual': self.residual}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> KVCacheFormat:
    d = dict(d)
    method = d.pop('method', 'kivi')
    if method != 'kivi':
      raise ValueError(f'kv_cache: method={method!r} is not known; only kivi caches exist.')
    return cls(**d)


def _pack(codes: jax.Array, bits: int) -> jax.Array:
  """codes: [..., H] uint8 < 2^bits -> [..., H * bits / 8] uint8, the first code in the low bits."""
  per = 8 // bits
  if per == 1:
    return codes
  c = codes.reshape(*codes.shape[:-1], -1, per)
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint8)


def _unpack(packed: jax.Array, bits: int) -> jax.Array:
  per = 8 // bits
  if per == 1:
    return packed
  shifts = jnp.arange(per, dtype=jnp.uint8) * bits
  c = (packed[..., None] >> shifts) & jnp.uint8(2 ** bits - 1)
  return c.reshape(*packed.shape[:-1], -1)


def _quantize_groups(x: jax.Array, axis: int, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Min-max codes of x over `axis` (a group axis of x) -> (codes uint8 like x, scale, min float16, axis dropped).

  The codes are taken on the stored (float16) grid, so dequantizing gives its nearest point to each number."""
  x = x.astype(jnp.float32)
  lo, hi = jnp.min(x, axis=axis), jnp.max(x, axis=axis)
  qmax = 2 ** bits - 1
  scale = ((hi - lo) / qmax).astype(jnp.float16)
  zero = lo.astype(jnp.float16)
  s, z = jnp.expand_dims(scale.astype(jnp.float32), axis), jnp.expand_dims(zero.astype(jnp.float32), axis)
  codes = jnp.clip(jnp.round((x - z) / jnp.where(s > 0, s, 1.0)), 0, qmax).astype(jnp.uint8)
  return codes, scale, zero


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
  """One layer's KIVI cache over `length` slots (P: `length` rounded up to a multiple of G; K heads of H channels).

  k_codes, v_codes: [B, P, K, H * bits / 8] uint8; k_scale, k_min: [B, P / G, K, H] float16 (per channel, per
  group of G tokens); v_scale, v_min: [B, P, K, H / G] float16 (per token, per group of G channels);
  k_window: [B, max(R, G), K, H]: keys of slots q_k(n) + j in full precision, q_k(n) = n // max(R, G) * max(R, G);
  v_window: [B, R, K, H]: values of slots q_v(n) + j, q_v(n) = max(n - R, 0); n: the slots written so far (the
  caller's cache index). Slots below q_k(n) (keys) and q_v(n) (values) are read from their codes.
  """

  k_codes: jax.Array
  k_scale: jax.Array
  k_min: jax.Array
  k_window: jax.Array
  v_codes: jax.Array
  v_scale: jax.Array
  v_min: jax.Array
  v_window: jax.Array
  fmt: KVCacheFormat = dataclasses.field(metadata=dict(static=True))
  length: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def zeros(cls, fmt: KVCacheFormat, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> QuantizedKV:
    fmt.check_head_dim(head_dim)
    g = fmt.group_size
    p = -(-length // g) * g
    packed = head_dim * fmt.bits // 8
    z = lambda *shape, dt=jnp.float16: jnp.zeros(shape, dt)
    return cls(k_codes=z(batch, p, kv_heads, packed, dt=jnp.uint8), k_scale=z(batch, p // g, kv_heads, head_dim),
               k_min=z(batch, p // g, kv_heads, head_dim),
               k_window=z(batch, fmt.key_chunk, kv_heads, head_dim, dt=dtype),
               v_codes=z(batch, p, kv_heads, packed, dt=jnp.uint8), v_scale=z(batch, p, kv_heads, head_dim // g),
               v_min=z(batch, p, kv_heads, head_dim // g),
               v_window=z(batch, fmt.residual, kv_heads, head_dim, dt=dtype),
               fmt=fmt, length=length)

  def _bounds(self, n: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q_k, q_v): how many leading slots hold key / value codes once n slots are written."""
    c = self.fmt.key_chunk
    return n // c * c, jnp.maximum(n - self.fmt.residual, 0)

  def dequantized(self) -> tuple[jax.Array, jax.Array]:
    """Every slot's keys and values from its codes: ([B, P, K, H], [B, P, K, H]) float32."""
    bits, g = self.fmt.bits, self.fmt.group_size
    kc = _unpack(self.k_codes, bits).astype(jnp.float32)
    b, p, kv, h = kc.shape
    kc = kc.reshape(b, p // g, g, kv, h)
    k = kc * self.k_scale[:, :, None].astype(jnp.float32) + self.k_min[:, :, None].astype(jnp.float32)
    vc = _unpack(self.v_codes, bits).astype(jnp.float32).reshape(b, p, kv, h // g, g)
    v = vc * self.v_scale[..., None].astype(jnp.float32) + self.v_min[..., None].astype(jnp.float32)
    return k.reshape(b, p, kv, h), v.reshape(b, p, kv, h)

  def view(self, n: jax.Array) -> dict:
    """{'k', 'v': [B, length, K, H]} as attention reads them with n slots written: codes dequantized below the
    quantized bounds, the full-precision windows above them (slots >= n hold anything finite; they are masked)."""
    qk, qv = self._bounds(n)
    k, v = self.dequantized()
    slots = jnp.arange(self.length, dtype=jnp.int32)
    dtype = self.k_window.dtype

    def read(quant, window, bound):
      if not window.shape[1]:
        return quant[:, :self.length].astype(dtype)
      fp = jnp.take(window, jnp.clip(slots - bound, 0, window.shape[1] - 1), axis=1)
      return jnp.where((slots < bound)[None, :, None, None], quant[:, :self.length].astype(dtype), fp)
    return {'k': read(k, self.k_window, qk), 'v': read(v, self.v_window, qv)}

  def store(self, view: dict, n_old: jax.Array, n_new: jax.Array) -> QuantizedKV:
    """The cache after slots n_old..n_new-1 of `view` (this cache's `view(n_old)` with those slots written) were
    written: numbers that leave the full-precision windows are quantized (once: older codes are kept)."""
    bits, g = self.fmt.bits, self.fmt.group_size
    qk_old, qv_old = self._bounds(n_old)
    qk, qv = self._bounds(n_new)
    b, _, kv, h = view['k'].shape
    p = self.k_codes.shape[1]
    pad = lambda x, extra: jnp.pad(x, ((0, 0), (0, p - self.length + extra), (0, 0), (0, 0)))
    k, v = pad(view['k'], 0), pad(view['v'], 0)
    slots = jnp.arange(p, dtype=jnp.int32)
    kc, ks, kz = _quantize_groups(k.reshape(b, p // g, g, kv, h), 2, bits)
    new_k = ((slots >= qk_old) & (slots < qk))[None, :, None, None]
    new_kg = new_k[:, ::g]
    vc, vs, vz = _quantize_groups(v.reshape(b, p, kv, h // g, g), 4, bits)
    new_v = ((slots >= qv_old) & (slots < qv))[None, :, None, None]
    window = lambda x, start, size: jax.lax.dynamic_slice_in_dim(pad(x, size), start, size, axis=1)
    return dataclasses.replace(
        self, k_codes=jnp.where(new_k, _pack(kc.reshape(b, p, kv, h), bits), self.k_codes),
        k_scale=jnp.where(new_kg, ks, self.k_scale), k_min=jnp.where(new_kg, kz, self.k_min),
        k_window=window(view['k'], qk, self.k_window.shape[1]).astype(self.k_window.dtype),
        v_codes=jnp.where(new_v, _pack(vc.reshape(b, p, kv, h), bits), self.v_codes),
        v_scale=jnp.where(new_v, vs, self.v_scale), v_min=jnp.where(new_v, vz, self.v_min),
        v_window=window(view['v'], qv, self.v_window.shape[1]).astype(self.v_window.dtype))


KV_CACHE_FIELD = 'jaxcompress_kv_cache'  # the config.json field holding a model's KV-cache format


def hf_kv_cache(hf: Any) -> KVCacheFormat | None:
  """The KV-cache format a Hugging Face config records (`KV_CACHE_FIELD`), None when it records none."""
  d = getattr(hf, KV_CACHE_FIELD, None)
  return None if d is None else KVCacheFormat.from_dict(d)


def hf_kv_fields(fmt: KVCacheFormat | None) -> dict[str, Any]:
  """The config.json fields recording `fmt` (transformers keeps a field it does not know and ignores it)."""
  return {} if fmt is None else {KV_CACHE_FIELD: fmt.to_dict()}


def kv_cache_format(model: Model, kv_cache: KVCacheFormat | str | None = None) -> KVCacheFormat | None:
  """The cache format `generate` uses: `kv_cache` itself; None: the model config's `kv_cache` (set by the `kivi`
  recipe stage; absent: full precision); FULL ('full'): full precision. None in the result is full precision."""
  if kv_cache is None:
    kv_cache = getattr(model.config, 'kv_cache', None)
    return None if kv_cache is None else kv_cache_format(model, kv_cache)
  if isinstance(kv_cache, str) and kv_cache == FULL:
    return None
  if isinstance(kv_cache, dict):
    return KVCacheFormat.from_dict(kv_cache)
  if not isinstance(kv_cache, KVCacheFormat):
    raise ValueError(f'kv_cache={kv_cache!r}: give a models.decode.KVCacheFormat(bits=, group_size=, residual=), '
                     f"{FULL!r} for a full-precision cache, or None for the model's default.")
  return kv_cache


def init_cache(model: Model, params: Params, batch: int, max_len: int, dtype=jnp.float32, *,
               kv_cache: KVCacheFormat | str | None = None) -> list:
  """Per-layer {'k', 'v': [batch, max_len, kv_heads, head_dim]} zeros, sized from each layer's weights; with a
  quantized format (`kv_cache`, or the model config's; see `kv_cache_format`) per-layer `QuantizedKV` caches."""
  fmt = kv_cache_format(model, kv_cache)
  module = model.bind(params)
  blocks = getattr(module, model.block_path)
  if fmt is None:
    return [blk.init_cache(batch, max_len, dtype) for blk in blocks]
  out = []
  for blk in blocks:
    _, _, kv_heads, head_dim = blk.init_cache(batch, 1, dtype)['k'].shape
    out.append(QuantizedKV.zeros(fmt, batch, max_len, kv_heads, head_dim, dtype))
  return out


def cache_bytes(cache: list) -> int:
  """Bytes a KV cache holds (codes, scales, minimums and full-precision windows of a quantized one); arrays or
  `jax.eval_shape` structures alike."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def forward_cached(model: Model, params: Params, tokens: jax.Array, cache: list[dict], index: jax.Array, *,
                   positions: jax.Array | None = None, key_valid: jax.Array | None = None
                   ) -> tuple[jax.Array, list[dict]]:
  """tokens: [B, T] written at cache slots index..index+T-1 -> (logits [B, T, V], updated cache).

  cache: `init_cache`'s, full precision or quantized (`QuantizedKV`, whose windows assume index counts the slots
  written before, as in `generate`).
  positions: [B, T] int32 positions of the tokens (default: their slots; smaller in left-padded rows).
  key_valid: [B, S] bool over the cache's S slots, False where a slot holds padding.
  Causality and the sliding window count cache slots, as transformers' masks do.
  """
  b, t = tokens.shape
  stored = cache if cache and isinstance(cache[0], QuantizedKV) else None
  if stored is not None:
    cache = [c.view(index) for c in stored]
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
  if stored is not None:
    new_cache = [s.store(c, index, index + t) for s, c in zip(stored, new_cache)]
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
             key: jax.Array | None = None, cache_dtype=None,
             kv_cache: KVCacheFormat | str | None = None) -> jax.Array:
  """prompt: [B, T] int -> [B, T + max_new_tokens] int32 (the prompt, then the new tokens).

  attention_mask: [B, T], 1 for real tokens and 0 for padding; prompts of different lengths are padded on the
    left (every row's last token is real). None: every row is full length.
  Greedy when temperature is 0; otherwise samples with `key` (required), so a fixed key gives fixed text.
  Token ids are checked to lie in [0, vocab_size) on the host.
  kv_cache: a `KVCacheFormat` (KIVI's quantized cache), 'full' (full precision), or None: the model config's
    `kv_cache` (set by the `kivi` recipe stage), full precision when it has none.
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
  fmt = kv_cache_format(model, kv_cache)
  key = jax.random.key(0) if key is None else key
  return _generate(model, core.resolve(params), prompt.astype(jnp.int32), attention_mask.astype(jnp.int32), key,
                   max_new_tokens, float(temperature), top_k, cache_dtype, fmt)


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


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _generate(model, params, prompt, prompt_mask, key, max_new_tokens, temperature, top_k, cache_dtype, fmt):
  b, t = prompt.shape
  dtype = cache_dtype or next(x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
  cache = init_cache(model, params, b, t + max_new_tokens, dtype, kv_cache=fmt or FULL)
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
