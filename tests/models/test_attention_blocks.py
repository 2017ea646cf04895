"""Causal attention in query blocks equals the one-block computation (NumPy float64 reference)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.models import layers


def _reference(q, k, v, mask, scale):
  """float64 grouped-query attention: q [B, T, N, H], k, v [B, S, K, H], mask [B, 1, T, S]."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, k) * scale
  logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bnts,bsnh->btnh', p, v)


def test_causal_blocks_match_reference_with_window_and_padding():
  rng = np.random.RandomState(0)
  b, t, n, kv, h = 2, 11, 4, 2, 8
  q, k, v = (rng.randn(b, t, heads, h).astype(np.float32) for heads in (n, kv, kv))
  valid = np.ones((b, t), np.int32)
  valid[1, 7:] = 0
  pos = jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)))
  mask = jax.jit(functools.partial(layers.attention_mask, k_len=t, causal=True, window=5))(
      pos, key_valid=jnp.asarray(valid))
  ref = _reference(*(x.astype(np.float64) for x in (q, k, v)), np.asarray(mask), h ** -0.5)
  for block in (None, 3, 4):
    # jitted as inside a model's apply: one program per block size (op by op, each block's slices and einsums
    # would compile one by one)
    attend = jax.jit(functools.partial(layers.dot_product_attention, scale=h ** -0.5, causal_block=block))
    out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6, err_msg=f'causal_block={block}')
