"""Multi-head -> grouped-query / multi-query attention by mean-pooling key and value heads (Ainslie et al.,
"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints", 2023).

Query head n reads key/value head n // (N / K) (as in transformers), so the K heads are pooled in consecutive
groups of K / G: new head g is the mean of old heads g K/G ... (g + 1) K/G - 1, and every query head keeps
reading the pool of the head it read before. The KV cache shrinks by K / G; a short up-training recovers the
quality lost.

    model, params = architecture.gqa(model, params, None, config=architecture.GQAConfig(kv_heads=2))  # the method
    model, params = architecture.convert_to_gqa(model, params, 2)                                     # the same
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.models import Model
from jaxcompress.train import transforms


def pool_heads(w: jnp.ndarray, kv_heads: int, target: int, head_dim: int) -> jnp.ndarray:
  """w: [..., kv_heads * head_dim] (a k/v kernel [in, K H] or bias [K H]) -> [..., target * head_dim]."""
  lead = w.shape[:-1]
  grouped = w.reshape(*lead, target, kv_heads // target, head_dim)
  return grouped.astype(jnp.float32).mean(axis=-2).astype(w.dtype).reshape(*lead, target * head_dim)


def check_kv_heads(model: Model, kv_heads: int, *, caller: str = '') -> None:
  """A ValueError unless the model has a key/value head count (the Llama family) that kv_heads divides; from the
  config alone. Messages start with `caller` where one is given."""
  where = f'{caller}: ' if caller else ''
  c = model.config
  if not hasattr(c, 'num_kv_heads'):
    raise ValueError(f'{where}{type(model).__name__} has no num_kv_heads; only grouped-query families '
                     f'(Llama, Mistral, Qwen2) can hold fewer key/value heads ({c.num_heads} heads here).')
  k = c.num_kv_heads
  if not isinstance(kv_heads, int) or kv_heads < 1 or k % kv_heads:
    divisors = [d for d in range(1, k + 1) if k % d == 0]
    raise ValueError(f'{where}kv_heads={kv_heads} does not divide the {k} key/value heads (with '
                     f'{c.num_heads} query heads); choose one of {divisors}.')


def convert_to_gqa(model: Model, params: dict, kv_heads: int) -> tuple[Model, dict]:
  """(spec, params) with every layer's key/value heads mean-pooled down to `kv_heads` (1: multi-query).

  The model must have `num_kv_heads` and `num_heads` (the Llama family); kv_heads must divide its current
  key/value head count. Dense k/v weights only (convert before compressing them).
  """
  check_kv_heads(model, kv_heads, caller='convert_to_gqa')
  c = model.config
  k = c.num_kv_heads
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


# Multi-head models without a key/value head count (BERT): grouped-query attention as tied heads ---------------


def _head_counts(model: Model, kv_heads: int) -> tuple[int, int]:
  """(query heads N, head_dim) of a multi-head model, with kv_heads checked to divide N."""
  c = model.config
  n = c.num_heads
  if getattr(c, 'num_kv_heads', n) != n:
    raise ValueError(f'group_kv_heads: the model already has {c.num_kv_heads} key/value heads for {n} query '
                     'heads; use convert_to_gqa for grouped-query families.')
  if not isinstance(kv_heads, int) or kv_heads < 1 or n % kv_heads:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f'group_kv_heads: kv_heads={kv_heads} does not divide the {n} attention heads; choose one of '
                     f'{divisors}.')
  return n, getattr(c, 'head_dim', None) or c.hidden_size // n


def group_kv_heads(model: Model, params: dict, kv_heads: int) -> dict:
  """Params whose k/v kernels [in, N H] and biases [N H] are mean-pooled to kv_heads heads ([in, G H], [G H]).

  For multi-head models without a key/value head count (BERT, GPT-2 with separate q/k/v): the pooled params do
  not run as they are; `expand_kv_heads` (or the `kv_groups` transform inside training) repeats each pooled
  head for its N / G query heads, which is exactly grouped-query attention (query head n reads key/value head
  n // (N / G)). The K/V projections and whatever a cache would hold shrink by N / G.
  """
  n, hd = _head_counts(model, kv_heads)
  return _map_kv(model, params, lambda w: pool_heads(w, n, kv_heads, hd))


def expand_kv_heads(model: Model, params: dict, kv_heads: int) -> dict:
  """Grouped params (`group_kv_heads`) -> the multi-head params the model runs: each of the kv_heads k/v heads
  repeated N / kv_heads times (consecutive query heads share one). Differentiable (gradients of the copies add
  up on the shared head)."""
  n, hd = _head_counts(model, kv_heads)

  def expand(w):
    lead = w.shape[:-1]
    if w.shape[-1] != kv_heads * hd:
      raise ValueError(f'expand_kv_heads: a k/v tensor of width {w.shape[-1]} is not kv_heads={kv_heads} heads of '
                       f'{hd}; pass params from group_kv_heads with the same kv_heads.')
    g = w.reshape(*lead, kv_heads, 1, hd)
    return jnp.broadcast_to(g, (*lead, kv_heads, n // kv_heads, hd)).reshape(*lead, n * hd)

  return _map_kv(model, params, expand)


def kv_groups(model: Model, kv_heads: int):
  """A `train.transforms.Transform` whose forward expands grouped k/v heads, so `fit` trains the pooled heads
  (params from `group_kv_heads`) of a multi-head model as grouped-query attention."""
  return transforms.Transform(forward=lambda params, state: expand_kv_heads(model, params, kv_heads))


def _map_kv(model: Model, params: dict, fn) -> dict:
  blocks = dict(params[model.block_path])
  for i, bp in blocks.items():
    attn = dict(bp['attn'])
    for name in ('k_proj', 'v_proj'):
      lin = dict(attn[name])
      for leaf in ('kernel', 'bias'):
        if lin.get(leaf) is not None:
          if not isinstance(lin[leaf], (jax.Array, np.ndarray)) and not hasattr(lin[leaf], 'shape'):
            raise ValueError(f'group_kv_heads: layers/{i}/attn/{name}/{leaf} is a {type(lin[leaf]).__name__} '
                             'leaf; group the dense checkpoint, then compress.')
          lin[leaf] = fn(jnp.asarray(lin[leaf]))
      attn[name] = lin
    blocks[i] = {**bp, 'attn': attn}
  return {**params, model.block_path: blocks}


# The method --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class GQAConfig:
  kv_heads: int = registry.field(1, range='[1, inf)')  # key/value heads after mean-pooling (1: MQA)


def gqa(model: Model, params: dict, calib=None, *, config: GQAConfig = GQAConfig()) -> tuple[Model, dict]:
  """`convert_to_gqa(model, params, config.kv_heads)`: every layer's key/value heads mean-pooled to kv_heads
  (a Llama-family model; no data needed)."""
  return convert_to_gqa(model, params, config.kv_heads)


def check(model: Model, params: dict, *, config: GQAConfig) -> None:
  """kv_heads against the model's head counts, before any weight is read (params unused: the config decides)."""
  del params
  check_kv_heads(model, config.kv_heads)


registry.register('gqa', GQAConfig, gqa, family='architecture', forbids=registry.COMPRESSED, adds='architecture',
                  check=check,
                  paper='Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head '
                  'Checkpoints" (EMNLP 2023)')
