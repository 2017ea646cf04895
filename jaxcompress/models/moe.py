"""A mixture-of-experts MLP that runs only each token's top-k experts (the runtime of MoEfication, Zhang et al.
2022; `architecture.moefication` builds its weights from a dense MLP).

    params (one MLP): router [d, E], up [E, d, f], gate [E, d, f] (gated MLPs), down [E, f, d],
                      up_bias, gate_bias [E, f] and down_bias [d] when the MLP has biases

Routing: expert e's score for token x is x . router[:, e]; each token picks its top_k experts (weight 1 each:
the experts are disjoint slices of one dense FFN, so their outputs add up to it). `dispatch` then gathers, per
expert, its C = min(N, ceil(capacity_factor N top_k / E)) highest-scoring tokens among those that picked it
and runs the expert on them only: FFN FLOPs are C E / N of the dense MLP's (capacity_factor top_k / E). A
token an expert has no room for loses that expert's contribution (counted in the returned drop fraction);
with top_k = E and capacity_factor >= 1, every expert takes every token and the MLP is the dense one.

Layer-wise calibration: `dispatch(..., observe=)` hands each stacked weight's routed input over as a
`layers.Routed` (the driver keeps per-expert statistics); GPTQ / SparseGPT / Wanda compress each expert from
them. The router is left float: it is tiny (d E), and a rounding error in it changes which experts run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcompress import core
from jaxcompress.models import layers


def route(x: jax.Array, moe: dict, top_k: int) -> jax.Array:
  """x [..., d] -> [..., E] float32 weights: 1 for each token's top_k experts by router score, else 0."""
  e = moe['router'].shape[1]
  if not 1 <= top_k <= e:
    raise ValueError(f'moe: top_k={top_k} must lie in [1, {e}] (the number of experts).')
  scores = x.astype(jnp.float32) @ moe['router'].astype(jnp.float32)
  idx = jax.lax.top_k(scores, top_k)[1]
  return jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=-2)


def expert_hidden(x: jax.Array, moe: dict, act: str) -> jax.Array:
  """x [..., E, d] (a row per expert) -> the experts' hidden activations [..., E, f]."""
  h = jnp.einsum('...ed,edf->...ef', x, moe['up'])
  if 'up_bias' in moe:
    h = h + moe['up_bias']
  if 'gate' not in moe:
    return layers.activation(act)(h)
  g = jnp.einsum('...ed,edf->...ef', x, moe['gate'])
  if 'gate_bias' in moe:
    g = g + moe['gate_bias']
  return layers.activation(act)(g) * h


def dense(x: jax.Array, moe: dict, top_k: int, act: str) -> jax.Array:
  """The top_k MLP computed for every expert and masked: x [..., d] -> [..., d]. Exact (no capacity), dense
  FLOPs; the reference `dispatch` is checked against."""
  w = route(x, moe, top_k)
  e = moe['router'].shape[1]
  xe = jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], e, x.shape[-1]))
  h = expert_hidden(xe, moe, act) * w[..., None].astype(x.dtype)
  y = jnp.einsum('...ef,efd->...d', h, moe['down'])
  return y + moe['down_bias'] if 'down_bias' in moe else y


def capacity_of(n: int, experts: int, top_k: int, capacity: float) -> int:
  """Tokens an expert runs on out of n: min(n, ceil(capacity n top_k / E))."""
  return min(n, math.ceil(capacity * n * top_k / experts))


def dispatch(x: jax.Array, moe: dict, top_k: int, act: str, capacity_factor: float = 1.25,
             observe: Callable[[layers.Routed], None] | None = None) -> tuple[jax.Array, jax.Array]:
  """The top_k MLP computing only the selected experts: x [N, d] -> (y [N, d], fraction of (token, expert)
  selections dropped for lack of capacity, a float32 scalar). Equals `dense` when nothing is dropped.

  observe: called with each stacked weight's routed input (`layers.Routed`: 'up' and 'gate' get the dispatched
    tokens [E, C, d], 'down' gets act(gate) * up of them [E, C, f]; slots without a routed token have keep
    False), for layer-wise calibration."""
  n, d = x.shape
  e = moe['router'].shape[1]
  cap = capacity_of(n, e, top_k, capacity_factor)
  w = route(x, moe, top_k)  # [N, E]
  scores = x.astype(jnp.float32) @ moe['router'].astype(jnp.float32)  # (shared with route's under jit)
  if cap == n:  # every expert has room for every token: no selection, no gather
    idx, keep = None, w.T > 0
    xe = jnp.broadcast_to(x, (e, n, d))
  else:
    pick = jnp.where(w.T > 0, scores.T, -jnp.inf)  # [E, N]
    top, idx = jax.lax.top_k(pick, cap)  # [E, C]: each expert's highest-scoring tokens among those that chose it
    keep = jnp.isfinite(top)
    xe = jnp.take(x, idx, axis=0)  # [E, C, d]
  token = None if idx is None else idx.astype(jnp.int32)
  if observe is not None:
    observe(layers.Routed('up', xe, token, keep))
    if 'gate' in moe:
      observe(layers.Routed('gate', xe, token, keep))
  # Expert-major batched matmuls (the expert axis leading in every operand: no transposes).
  h = jnp.einsum('ecd,edf->ecf', xe, moe['up'])
  if 'up_bias' in moe:
    h = h + moe['up_bias'][:, None]
  if 'gate' in moe:
    g = jnp.einsum('ecd,edf->ecf', xe, moe['gate'])
    if 'gate_bias' in moe:
      g = g + moe['gate_bias'][:, None]
    h = layers.activation(act)(g) * h
  else:
    h = layers.activation(act)(h)
  if observe is not None:
    observe(layers.Routed('down', h, token, keep))
  ye = jnp.einsum('ecf,efd->ecd', h, moe['down']) * keep[..., None].astype(x.dtype)
  y = ye.sum(0) if idx is None else jnp.zeros_like(x).at[idx.reshape(-1)].add(ye.reshape(-1, d))
  if 'down_bias' in moe:
    y = y + moe['down_bias']
  dropped = 1.0 - keep.sum() / jnp.maximum(w.sum(), 1.0)
  return y, dropped


class MoEMLP(nnx.Module):
  """The MLP of a MoEfied block: `dispatch` over the flattened tokens. Weights as in the module docstring."""

  def __init__(self, d: int, f: int, *, experts: int, top_k: int, capacity: float, gated: bool, bias: bool,
               act: str, std: float, dtype, rngs: nnx.Rngs):
    if experts < 1 or f % experts:
      raise ValueError(f'MoEMLP: intermediate size {f} does not split into experts={experts} equal experts.')
    if not 1 <= top_k <= experts:
      raise ValueError(f'MoEMLP: top_k={top_k} must lie in [1, experts={experts}].')
    if capacity <= 0:
      raise ValueError(f'MoEMLP: capacity={capacity} must be positive (1.0: exactly top_k / E of the FLOPs).')
    fe = f // experts
    self.router = nnx.Param(layers.normal_init(rngs, (d, experts), std, dtype))
    self.up = nnx.Param(layers.normal_init(rngs, (experts, d, fe), std, dtype))
    self.gate = nnx.Param(layers.normal_init(rngs, (experts, d, fe), std, dtype)) if gated else None
    self.down = nnx.Param(layers.normal_init(rngs, (experts, fe, d), std, dtype))
    self.up_bias = nnx.Param(jnp.zeros((experts, fe), dtype)) if bias else None
    self.gate_bias = nnx.Param(jnp.zeros((experts, fe), dtype)) if bias and gated else None
    self.down_bias = nnx.Param(jnp.zeros((d,), dtype)) if bias else None
    self.top_k, self.capacity, self.act = top_k, capacity, act

  def weights(self) -> dict:
    names = ('router', 'up', 'gate', 'down', 'up_bias', 'gate_bias', 'down_bias')
    return {n: core.materialize(layers.value(getattr(self, n))) for n in names if getattr(self, n) is not None}

  def __call__(self, x: jax.Array) -> jax.Array:
    lead = x.shape[:-1]
    y, _ = dispatch(x.reshape(-1, x.shape[-1]), self.weights(), self.top_k, self.act, self.capacity,
                    observe=lambda routed: layers.observe_routed(self, routed))
    return y.reshape(*lead, -1)
