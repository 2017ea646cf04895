"""MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", 2022):
split a dense FFN's neurons into experts by clustering them, route each token to its top-k experts, and run
only those: fewer FLOPs from the same weights.

    moe = moefy_mlp(params['layers'][i]['mlp'], num_experts=8, key=key)  # gated (SwiGLU) or plain MLP weights
    y = moe_mlp(x, moe, top_k=2, act='silu')                          # exact: the selected experts' sum
    y, dropped = moe_mlp_dispatch(x, moe, top_k=2, act='silu')        # the same, computing only those experts
    spec, p = moefy_model(model, params, num_experts=8, top_k=2, key=key)  # a Llama running top-2 in every block
    spec, p = moefy(model, params, None, config=MoEfyConfig(num_experts=8, top_k=2))  # the method (key: the seed's)

A neuron j of a gated FFN is (gate[:, j], up[:, j], down[j, :]); neurons with similar input weights fire
together, so balanced k-means over the normalized input columns groups them into equal-size experts. The
router scores expert e by x . c_e with c_e the mean gate (or up) column of its neurons, a training-free
proxy for how strongly the expert fires.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.models import Model
from jaxcompress.models import moe as moe_lib


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


def moefy_mlp(mlp: dict, num_experts: int, key: jax.Array, iters: int = 20) -> dict:
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
  if gate is not None and 'gate_proj/bias' in flat:
    out['gate_bias'] = jnp.asarray(np.asarray(flat['gate_proj/bias'])[neurons])
  if 'down_proj/bias' in flat:
    out['down_bias'] = jnp.asarray(flat['down_proj/bias'])
  router_src = out['gate'] if gate is not None else out['up']
  out['router'] = jnp.mean(router_src, axis=-1).T  # [d, E]
  return out


# The runtime lives with the models (a Llama option runs it inside every block); these names stay here.
route = moe_lib.route
moe_mlp = moe_lib.dense
moe_mlp_dispatch = moe_lib.dispatch


def moefy_model(model: Model, params: dict, *, num_experts: int, top_k: int, key: jax.Array,
                capacity: float = 1.25, iters: int = 20) -> tuple[Model, dict]:
  """(spec, params) of the model with every block's MLP MoEfied (`moefy_mlp`) and run as a mixture that computes
  only each token's top_k experts (`models.moe.MoEMLP`, `LlamaConfig.moe_*`). Attention, norms, embeddings
  and head are shared with `params`. Another top_k or capacity needs no new params:
  `type(model)(dataclasses.replace(spec.config, moe_top_k=k))`.
  """
  c = model.config
  if not hasattr(c, 'moe_experts'):
    raise ValueError(f'moefy_model: {type(model).__name__} has no mixture-of-experts option; the Llama family '
                     'has one (use moefy_mlp and moe_mlp_dispatch on other MLPs).')
  if c.moe_experts:
    raise ValueError(f'moefy_model: the model is already a mixture of {c.moe_experts} experts.')
  if not 1 <= top_k <= num_experts:
    raise ValueError(f'moefy_model: top_k={top_k} must lie in [1, num_experts={num_experts}].')
  keys = jax.random.split(key, model.num_layers(params))
  blocks = {}
  for i, k in enumerate(keys):
    bp = model.block_params(params, i)
    moe = moefy_mlp(bp['mlp'], num_experts, k, iters)
    blocks[i] = {**params[model.block_path][i], 'mlp': {n: v for n, v in moe.items() if n != 'neurons'}}
  spec = type(model)(dataclasses.replace(c, moe_experts=num_experts, moe_top_k=top_k, moe_capacity=capacity))
  return spec, {**params, model.block_path: blocks}


# The method --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEfyConfig:
  num_experts: int = 8  # experts each MLP's neurons are clustered into
  top_k: int = 4  # experts each token runs
  capacity: float = 1.25  # tokens an expert takes, as a multiple of its even share


def moefy(model: Model, params: dict, calib=None, *, config: MoEfyConfig = MoEfyConfig(),
          key: jax.Array | None = None) -> tuple[Model, dict]:
  """`moefy_model`: every block's MLP split into config.num_experts experts (balanced k-means started from
  `key`; None: calib.key('moefy')), each token running its top_k (a Llama-family model; no data needed)."""
  key = registry.as_context(calib).key('moefy') if key is None else key
  return moefy_model(model, params, num_experts=config.num_experts, top_k=config.top_k, capacity=config.capacity,
                     key=key)


registry.register('moefy', MoEfyConfig, moefy, family='architecture', forbids=registry.COMPRESSED + ('architecture',),
                  adds='architecture', paper='Zhang et al., "MoEfication: Transformer Feed-forward Layers are '
                  'Mixtures of Experts" (ACL Findings 2022)')
