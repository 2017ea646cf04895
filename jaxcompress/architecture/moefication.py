"""MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", 2022):
split a dense FFN's neurons into experts by clustering them, route each token to its top-k experts, and run
only those: fewer FLOPs from the same weights.

    moe = moefy(params['layers'][i]['mlp'], num_experts=8, key=key)   # gated (SwiGLU) or plain MLP weights
    y = moe_mlp(x, moe, top_k=2, act='silu')                          # exact: the selected experts' sum
    y, dropped = moe_mlp_dispatch(x, moe, top_k=2, act='silu')        # the same, computing only those experts

A neuron j of a gated FFN is (gate[:, j], up[:, j], down[j, :]); neurons with similar input weights fire
together, so balanced k-means over the normalized input columns groups them into equal-size experts. The
router scores expert e by x . c_e with c_e the mean gate (or up) column of its neurons, a training-free
proxy for how strongly the expert fires.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.models import layers


def balanced_kmeans(points: np.ndarray, k: int, key: jax.Array, iters: int = 20) -> np.ndarray:
  """Assignment [N] int of N points [N, D] to k clusters of exactly N / k points each.

  Lloyd iterations from k points drawn with `key`, each ending with a balanced assignment: points take their
  nearest centroid with room left, in order of how much they prefer it (a greedy capacity-constrained pass).
  """
  n = points.shape[0]
  if k < 1 or n % k:
    raise ValueError(f'balanced_kmeans: {n} neurons do not split into num_experts={k} equal experts; choose a '
                     'divisor of the FFN width.')
  x = np.asarray(points, np.float64)
  cent = x[np.asarray(jax.random.choice(key, n, (k,), replace=False))]
  cap = n // k
  assign = np.zeros(n, np.int64)
  for _ in range(iters):
    dist = ((x[:, None, :] - cent[None]) ** 2).sum(-1)  # [N, k]
    room = np.full(k, cap)
    assign[:] = -1
    order = np.argsort(dist.min(1) - np.sort(dist, 1)[:, 1])  # strongest preference first
    for i in order:
      for c in np.argsort(dist[i]):
        if room[c]:
          assign[i], room[c] = c, room[c] - 1
          break
    new = np.stack([x[assign == c].mean(0) for c in range(k)])
    if np.allclose(new, cent):
      break
    cent = new
  return assign


def moefy(mlp: dict, num_experts: int, key: jax.Array, iters: int = 20) -> dict:
  """Dense MLP weights {'gate_proj'?, 'up_proj', 'down_proj': {'kernel', 'bias'?}} -> experts

      {'up': [E, d, f/E], 'gate': [E, d, f/E] (gated MLPs), 'down': [E, f/E, d], 'up_bias': [E, f/E] and
       'down_bias': [d] (when biased), 'router': [d, E], 'neurons': [E, f/E] (original neuron ids)}

  Every neuron lands in exactly one expert, so running all experts reproduces the dense MLP.
  """
  flat = core.paths.flatten(core.materialize_tree(mlp))
  up, down = np.asarray(flat['up_proj/kernel'], np.float32), np.asarray(flat['down_proj/kernel'], np.float32)
  gate = np.asarray(flat['gate_proj/kernel'], np.float32) if 'gate_proj/kernel' in flat else None
  cols = np.concatenate([w for w in (gate, up) if w is not None], 0).T  # [F, in features]
  cols = cols / np.maximum(np.linalg.norm(cols, axis=1, keepdims=True), 1e-12)
  assign = balanced_kmeans(cols, num_experts, key, iters)
  neurons = np.stack([np.nonzero(assign == e)[0] for e in range(num_experts)])  # [E, F/E]
  take_cols = lambda w: np.transpose(w[:, neurons], (1, 0, 2))  # [d, F] -> [E, d, F/E]
  out = {'up': jnp.asarray(take_cols(up)), 'down': jnp.asarray(down[neurons]),
         'neurons': jnp.asarray(neurons, jnp.int32)}
  if gate is not None:
    out['gate'] = jnp.asarray(take_cols(gate))
  if 'up_proj/bias' in flat:
    out['up_bias'] = jnp.asarray(np.asarray(flat['up_proj/bias'])[neurons])
  if 'down_proj/bias' in flat:
    out['down_bias'] = jnp.asarray(flat['down_proj/bias'])
  router_src = out['gate'] if gate is not None else out['up']
  out['router'] = jnp.mean(router_src, axis=-1).T  # [d, E]
  return out


def route(x: jax.Array, moe: dict, top_k: int) -> jax.Array:
  """x [..., d] -> [..., E] float32 weights: 1 for each token's top_k experts by router score, else 0."""
  e = moe['router'].shape[1]
  if not 1 <= top_k <= e:
    raise ValueError(f'route: top_k={top_k} must lie in [1, {e}] (the number of experts).')
  scores = x.astype(jnp.float32) @ moe['router']
  idx = jax.lax.top_k(scores, top_k)[1]
  return jnp.sum(jax.nn.one_hot(idx, e, dtype=jnp.float32), axis=-2)


def _expert_hidden(x, moe, act):
  """x [..., E, d] (a row per expert) -> the experts' hidden activations [..., E, f/E]."""
  h = jnp.einsum('...ed,edf->...ef', x, moe['up'])
  if 'up_bias' in moe:
    h = h + moe['up_bias']
  if 'gate' in moe:
    return layers.activation(act)(jnp.einsum('...ed,edf->...ef', x, moe['gate'])) * h
  return layers.activation(act)(h)


def moe_mlp(x: jax.Array, moe: dict, top_k: int, act: str) -> jax.Array:
  """The MoEfied MLP, exact: x [..., d] -> sum over each token's top_k experts [..., d]. Computes every expert
  and masks (for quality measurements; `moe_mlp_dispatch` computes only the selected ones)."""
  w = route(x, moe, top_k)
  e = moe['router'].shape[1]
  xe = jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], e, x.shape[-1]))
  h = _expert_hidden(xe, moe, act) * w[..., None]
  y = jnp.einsum('...ef,efd->...d', h, moe['down'])
  return y + moe['down_bias'] if 'down_bias' in moe else y


def moe_mlp_dispatch(x: jax.Array, moe: dict, top_k: int, act: str, capacity_factor: float = 1.25
                     ) -> tuple[jax.Array, jax.Array]:
  """The MoEfied MLP computing only selected experts: x [N, d] -> (y [N, d], fraction of (token, expert)
  selections dropped because an expert's capacity C = ceil(capacity_factor N top_k / E) was full).

  Each expert gathers its C highest-scoring tokens among those that chose it, so FLOPs are
  capacity_factor * top_k / E of the dense MLP's; with no drops y equals `moe_mlp`.
  """
  n, _ = x.shape
  e = moe['router'].shape[1]
  cap = min(n, int(np.ceil(capacity_factor * n * top_k / e)))
  w = route(x, moe, top_k)  # [N, E]
  scores = x.astype(jnp.float32) @ moe['router']
  pick = jnp.where(w.T > 0, scores.T, -jnp.inf)  # [E, N]
  top, idx = jax.lax.top_k(pick, cap)  # [E, C]
  keep = jnp.isfinite(top).astype(x.dtype)
  xe = jnp.take(x, idx, axis=0)  # [E, C, d]
  h = _expert_hidden(jnp.swapaxes(xe, 0, 1), moe, act)  # [C, E, f/E]
  ye = jnp.einsum('cef,efd->ecd', h, moe['down']) * keep[..., None]
  y = jnp.zeros_like(x).at[idx.reshape(-1)].add(ye.reshape(-1, x.shape[1]))
  if 'down_bias' in moe:
    y = y + moe['down_bias']
  dropped = 1.0 - keep.sum() / jnp.maximum(w.sum(), 1.0)
  return y, dropped
