"""Flax NNX building blocks shared by the model families.

Every matmul goes through `jaxcompress.core.linear`, so any weight may be dense or compressed. Sizes (heads,
MLP width) are read from the weights at call time, never stored, so structurally pruned blocks still run.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcompress import core
from jaxcompress.core import hadamard

# Hidden states are pinned to this sharding at block boundaries while `activation_sharding()` is active.
_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar('jaxcompress_activation_sharding', default=None)


@contextlib.contextmanager
def activation_sharding(sharding):
  """Within this context (entered inside a traced function) models constrain hidden states [B, T, D] and
  outputs [B, T, V] to `sharding` (rows over the batch axes). Without it the partitioner may follow
  fsdp-sharded weights and gather the whole batch onto every device."""
  token = _ACTIVATIONS.set(sharding)
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: jax.Array) -> jax.Array:
  sharding = _ACTIVATIONS.get()
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# While `observe_inputs(fn)` is active, every Linear hands (itself, its input) to fn before multiplying
# (see Model.block_with_inputs and the streaming calibration driver built on it).
_OBSERVER: contextvars.ContextVar[tuple | None] = contextvars.ContextVar('jaxcompress_observer', default=None)


@contextlib.contextmanager
def observe_inputs(fn: Callable[[nnx.Module, jax.Array], None]):
  """Within this context every `Linear` call runs fn(module, x) first, x: its input [..., in], in call order; a
  mixture-of-experts MLP (`models.moe.MoEMLP`) runs fn(module, Routed(...)) for each of its stacked expert weights.

  A Linear that runs inside a transform nested in the one that entered the context (`lax.scan` and
  `jax.checkpoint` in `apply(scan=True, remat=True)`, a `vmap`) raises instead: its input would be a tracer of
  that inner transform, and keeping it would leak the tracer out of it.
  """
  token = _OBSERVER.set((fn, _trace_state()))
  try:
    yield
  finally:
    _OBSERVER.reset(token)


@contextlib.contextmanager
def capture_inputs():
  """Within this context every `Linear` call appends (id(module), input) to the yielded list, in call order."""
  records: list[tuple[int, jax.Array]] = []
  with observe_inputs(lambda module, x: records.append((id(module), x))):
    yield records


class Routed(NamedTuple):
  """The input of one stacked expert weight [E, in, out] (`models.moe`), as `observe_inputs` hands it over.

  name:  the weight's name within its module ('up', 'gate', 'down').
  x:     [E, C, in] the rows each expert multiplies (C capacity slots per expert).
  token: [E, C] int32, the row of the flattened input [N, in] each slot holds; None: slot c holds row c (C = N).
  keep:  [E, C] bool, the slot holds a token routed to that expert (False: an empty slot, whose row is junk).
  """

  name: str
  x: jax.Array
  token: jax.Array | None
  keep: jax.Array


def observe_routed(module: nnx.Module, routed: Routed) -> None:
  """Hands a stacked expert weight's routed input to the active `observe_inputs` function (as its x)."""
  _observe(module, routed)


def _trace_state():
  return jax.extend.core.get_opaque_trace_state(convention='nnx')


def _observe(module: nnx.Module, x: jax.Array) -> None:
  active = _OBSERVER.get()
  if active is None:
    return
  fn, trace = active
  if _trace_state() != trace:
    raise ValueError('a Linear ran inside a transform (lax.scan, jax.checkpoint, vmap) nested in the one where '
                     'observe_inputs/capture_inputs was entered; its input would leak a tracer. Record inputs '
                     'with scan=False and remat=False (Model.linear_inputs and block_with_inputs do).')
  fn(module, x)


def value(v: nnx.Variable | None):
  """The (possibly compressed) value held by an NNX variable; None passes through."""
  return None if v is None else v.get_value()


def normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). kernel: [in, out]."""

  def __init__(self, din: int, dout: int, *, bias: bool, std: float, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(normal_init(rngs, (din, dout), std, dtype))
    self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    _observe(self, x)
    return core.linear(x, value(self.kernel), value(self.bias))


class Embed(nnx.Module):
  """Token (or position) embedding table: [vocab, d]."""

  def __init__(self, num: int, dim: int, *, std: float, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(normal_init(rngs, (num, dim), std, dtype))

  def __call__(self, ids: jax.Array, dtype=None) -> jax.Array:
    return core.embedding_lookup(value(self.embedding), ids, dtype)

  def attend(self, h: jax.Array) -> jax.Array:
    """h: [..., d] -> logits [..., vocab] with the table as a tied output head."""
    return core.linear_transposed(h, value(self.embedding))


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (as Llama's reference implementation does)."""

  def __init__(self, dim: int, *, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return core.materialize(value(self.scale)).astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm with scale and bias, statistics in float32."""

  def __init__(self, dim: int, *, eps: float, dtype):
    self.scale = nnx.Param(jnp.ones((dim,), dtype))
    self.bias = nnx.Param(jnp.zeros((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * core.materialize(value(self.scale)).astype(jnp.float32)
    return (y + core.materialize(value(self.bias)).astype(jnp.float32)).astype(x.dtype)


ACTIVATIONS = {
    'silu': jax.nn.silu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


def activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
  """What every block needs besides its input.

  positions:   [batch, q_len] int32 absolute positions of the queries.
  mask:        [batch, 1, q_len, k_len] bool, True where a query may attend to a key.
  cache_index: int32 scalar: where this step's keys are written in a KV cache (None without a cache).
  causal_block: static; when set, `mask` never lets query i see a key after index i (a causal full-sequence
    pass), so attention runs in query blocks of this size and skips the keys after each block.
  """

  positions: jax.Array
  mask: jax.Array
  cache_index: jax.Array | None = None
  causal_block: int | None = dataclasses.field(default=None, metadata=dict(static=True))


def attention_mask(q_pos: jax.Array, k_len: int, *, causal: bool, key_valid: jax.Array | None = None,
                   window: int | None = None) -> jax.Array:
  """q_pos: [B, T] absolute query positions; keys sit at positions 0..k_len-1 -> [B, 1, T, k_len] bool."""
  k_pos = jnp.arange(k_len, dtype=jnp.int32)[None, None, :]
  q = q_pos[:, :, None]
  allowed = jnp.ones((q_pos.shape[0], q_pos.shape[1], k_len), bool)
  if causal:
    allowed &= k_pos <= q
  if window is not None:
    allowed &= q - k_pos < window
  if key_valid is not None:
    allowed &= key_valid[:, None, :].astype(bool)
  return allowed[:, None]


# Query block of causal full-sequence attention. Measured on 2 CPU cores (8x512, 12 heads over 4 key/value
# heads): blocks of 64-128 queries run the attention 2-3x faster than one [T, S] block, since they skip the
# masked upper triangle and their logits stay in cache; 256 is slower again.
CAUSAL_BLOCK = 128


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *,
                          return_probs: bool = False, causal_block: int | None = None
                          ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Grouped-query attention with a float32 softmax.

  q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K; mask: [B, 1, T, S] bool -> [B, T, N, H].
  return_probs: also return the attention probabilities [B, N, T, S] (in v's dtype, as used); query head n
    reads key/value head n // (N / K), as in transformers.
  causal_block: the caller guarantees that query i sees no key after index i (S == T): queries run in blocks of
    this many, each against keys up to its last query only (the skipped logits would be masked anyway, so the
    result is the same up to float rounding of the softmax sums). Ignored with return_probs.
  """
  t = q.shape[1]
  if q.shape[2] == 0:  # every head of a structurally pruned layer removed: nothing to attend with
    out = jnp.zeros(q.shape, v.dtype)
    return (out, jnp.zeros((q.shape[0], 0, t, k.shape[1]), v.dtype)) if return_probs else out
  if causal_block and not return_probs and k.shape[1] == t and t > causal_block:
    outs = []
    for start in range(0, t, causal_block):
      end = min(start + causal_block, t)
      outs.append(_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, :, start:end, :end], scale)[0])
    return jnp.concatenate(outs, axis=1)
  out, probs = _attention(q, k, v, mask, scale)
  return (out, probs) if return_probs else out


def _attention(q, k, v, mask, scale):
  """One block of `dot_product_attention`: (out [B, T, N, H], probabilities [B, N, T, S])."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  if n % kv:
    raise ValueError(f'attention: {n} query heads are not a multiple of {kv} key/value heads.')
  q = q.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum('btkgh,bskh->bkgts', q, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskh->btkgh', probs, v).reshape(b, t, n, h)
  return out, probs.reshape(b, n, t, probs.shape[-1])


def update_cache(cache: dict, k: jax.Array, v: jax.Array, index: jax.Array) -> dict:
  """Writes k, v: [B, T, K, H] at position `index` of cache {'k','v': [B, S, K, H]}."""
  start = (0, index, 0, 0)
  return {'k': jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), start),
          'v': jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), start)}


class MLP(nnx.Module):
  """down_proj(act(up_proj(x))): the two-layer MLP of GPT-2 and BERT."""

  def __init__(self, dim: int, inner: int, act: str, *, std: float, dtype, rngs: nnx.Rngs,
               online_hadamard: int = 0):
    self.up_proj = Linear(dim, inner, bias=True, std=std, dtype=dtype, rngs=rngs)
    self.down_proj = Linear(inner, dim, bias=True, std=std, dtype=dtype, rngs=rngs)
    self.act = act
    self.online_hadamard = online_hadamard  # > 0: both inputs rotated by a block Hadamard of this size (x·Q)

  def __call__(self, x):
    rotate = ((lambda v: hadamard.hadamard_transform(v, block=self.online_hadamard)) if self.online_hadamard
              else (lambda v: v))
    return self.down_proj(rotate(activation(self.act)(self.up_proj(rotate(x)))))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, ctx: Context, cache: dict | None, scale: float,
                     *, return_probs: bool = False) -> tuple:
  """Attention of this step's q over its k, v, or over the KV cache after writing k, v into it.

  q: [B, T, N, H]; k, v: [B, T, K, H] -> ([B, T, N * H], updated cache or None), plus the probabilities
  [B, N, T, S] as a third element when return_probs.
  """
  if cache is not None:
    cache = update_cache(cache, k, v, ctx.cache_index)
    k, v = cache['k'].astype(q.dtype), cache['v'].astype(q.dtype)
  out = dot_product_attention(q, k, v, ctx.mask, scale, return_probs=return_probs,
                              causal_block=None if cache is not None else ctx.causal_block)
  out, probs = out if return_probs else (out, None)
  out = out.reshape(*out.shape[:2], -1)
  return (out, cache, probs) if return_probs else (out, cache)


class PreNormBlock(nnx.Module):
  """The decoder block of GPT-2 and Llama: h + attn(norm(h)), then h + mlp(norm(h))."""

  def __init__(self, attn_norm: nnx.Module, attn: nnx.Module, mlp_norm: nnx.Module, mlp: nnx.Module,
               head_dim: int):
    self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
    self.head_dim = head_dim

  def __call__(self, h, ctx: Context, cache=None, *, return_probs: bool = False):
    """-> (h, cache), or (h, cache, attention probabilities [B, N, T, S]) when return_probs."""
    a, cache, *probs = self.attn(self.attn_norm(h), ctx, cache, return_probs=return_probs)
    h = h + a
    return (h + self.mlp(self.mlp_norm(h)), cache, *probs)

  def init_cache(self, batch: int, max_len: int, dtype) -> dict:
    """Zeros {'k', 'v': [batch, max_len, kv_heads, head_dim]}, kv_heads read from this block's k_proj."""
    kv_heads = value(self.attn.k_proj.kernel).shape[1] // self.head_dim
    return {n: jnp.zeros((batch, max_len, kv_heads, self.head_dim), dtype) for n in ('k', 'v')}


# Rotary position embedding ----------------------------------------------------------------------------------


def rope_frequencies(head_dim: int, theta: float, rope: tuple = ()) -> tuple[np.ndarray, float]:
  """Inverse frequencies [head_dim // 2] (float64 numpy) and the attention scaling, for a rope spec.

  rope: () for plain RoPE, or a sorted tuple of (key, value) pairs from the HF `rope_parameters`
  ('linear' divides positions; 'llama3' rescales low frequencies as in Llama 3.1).
  """
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  params = dict(rope)
  kind = params.get('rope_type', 'default')
  if kind == 'default':
    return inv, 1.0
  if kind == 'linear':
    return inv / params['factor'], 1.0
  if kind == 'llama3':
    factor, lo, hi = params['factor'], params['low_freq_factor'], params['high_freq_factor']
    old_len = params['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return np.where(medium, smoothed, scaled), 1.0
  raise ValueError(f"rope_type {kind!r} is not supported; supported: 'default', 'linear', 'llama3'.")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scaling: float = 1.0) -> jax.Array:
  """x: [B, T, N, H], positions: [B, T] -> x rotated, with the half-split layout of HF checkpoints."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb) * scaling, jnp.sin(emb) * scaling
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)
