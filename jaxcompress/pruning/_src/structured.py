"""Retraining-free structured pruning of attention heads and MLP neurons (Kwon et al. 2022, "A Fast
Post-Training Pruning Framework for Transformers"), and whole-block removal.

A mask m (1.0 per attention unit and per MLP neuron) multiplies each unit's contribution to its block's output.
Scaling the rows of o_proj / down_proj by m is the same function, so the masks need no model change
(`apply_masks`). The importance of a unit is its diagonal Fisher information

    F_i = Σ_examples (∂ loss_example / ∂ m_i)²,   evaluated at m = 1,

(`fisher`). Removing unit i costs ≈ ½ F_i of loss; `search` keeps the units of largest Fisher under a FLOPs
budget (Kwon's Algorithm 1: heads and neurons cost different FLOPs, so every head count is tried with the
neurons that fit beside it). `tune` then solves, layer by layer on calibration data, the least-squares scales of
the kept units that best reconstruct the dense model's sublayer outputs (Kwon's mask tuning), and folds them
into o_proj / down_proj. `slice_units` makes the result physically smaller: each layer keeps its own number of
heads and its own MLP width (the families read both from the weight shapes).

An attention unit is one key/value head with the query heads that read it (one head without grouped-query
attention), so that q, k, v and o are sliced consistently.

    h_fisher, n_fisher = structured.fisher(model, params, batches, loss_fn)
    keep = structured.search(model, params, h_fisher, n_fisher, budget=0.6, seq_len=128)
    small_model, small = structured.slice_units(model, params, keep)
    small = structured.tune(model, params, small_model, small, batches)

The method `structured` runs these four steps on the calibration batches to a FLOPs budget:

    small_model, small = pruning.structured(model, params, batches, config=pruning.StructuredConfig(flops=0.6))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.models import Model, Params

ATTN_Q, ATTN_K, ATTN_V, ATTN_O = (f'attn/{p}_proj/kernel' for p in 'qkvo')
SUPPORTED = ('llama', 'bert')  # families whose block layout `tune` knows (pre-norm Llama, post-norm BERT)
WIDTHS_FIELD = 'jaxcompress_layer_widths'  # config.json field of `save`: per-layer heads and MLP widths


class Units(NamedTuple):
  """What each block of a model holds, read from its weight shapes.

  heads:      per layer, the number of attention units (key/value heads).
  group:      query heads per unit (1 without grouped-query attention).
  head_dim:   width of one head.
  neurons:    per layer, the MLP width.
  mlp_in:     kernel paths within a block that produce the MLP's hidden units (gate/up, or up).
  mlp_out:    kernel path within a block that reads them (down_proj).
  """

  heads: tuple[int, ...]
  group: int
  head_dim: int
  neurons: tuple[int, ...]
  mlp_in: tuple[str, ...]
  mlp_out: str


class Keep(NamedTuple):
  """Per layer, which units survive: heads[l] bool [units_l], neurons[l] bool [width_l]."""

  heads: tuple[np.ndarray, ...]
  neurons: tuple[np.ndarray, ...]


def _check_family(model: Model) -> None:
  if model.family not in SUPPORTED:
    raise ValueError(f'structured pruning supports the {SUPPORTED} families; got {model.family!r} '
                     f'({type(model).__name__}).')


def _head_dim(model: Model) -> int:
  cfg = model.config
  return cfg.dim_per_head if hasattr(type(cfg), 'dim_per_head') else cfg.head_dim


def units(model: Model, params: Params) -> Units:
  """The attention units and MLP widths of every block, from the weight shapes (works on narrowed models)."""
  _check_family(model)
  groups = {g.name: g for g in model.block_structure()}
  mlp_in, mlp_out = groups['mlp_in'].kernels, groups['mlp_out'].kernels[0]
  hd = _head_dim(model)
  cfg = model.config
  # Query heads per key/value head: pruning removes whole units, so the config's ratio holds in every layer.
  group = cfg.num_heads // (getattr(cfg, 'num_kv_heads', None) or cfg.num_heads)
  heads, neurons = [], []
  for i in range(model.num_layers(params)):
    flat = core.paths.flatten(model.block_params(params, i))
    nq, nkv = core.shape_of(flat[ATTN_Q])[1] // hd, core.shape_of(flat[ATTN_K])[1] // hd
    if nq != group * nkv:
      raise ValueError(f'layer {i} has {nq} query heads and {nkv} key/value heads; the config implies '
                       f'{group} query heads per key/value head.')
    heads.append(nkv)
    neurons.append(core.shape_of(flat[mlp_out])[0])
  return Units(tuple(heads), group, hd, tuple(neurons), mlp_in, mlp_out)


# FLOPs -------------------------------------------------------------------------------------------------------


def unit_flops(model: Model, params: Params, seq_len: int) -> tuple[float, float]:
  """(FLOPs per token of one attention unit, of one MLP neuron) in a forward pass over seq_len tokens.

  A unit: its q, k, v columns and o rows (2·d·hd·(2·group + 2)) plus its attention scores and weighted values
  (2·2·group·hd·context, context = seq_len, or (seq_len + 1) / 2 for a causal model). A neuron: one column of
  each MLP input kernel and one row of the output kernel (2·d per kernel).
  """
  u = units(model, params)
  d = model.config.hidden_size
  ctx = seq_len if not model.causal else (seq_len + 1) / 2
  window = model._window()
  if window is not None:
    ctx = min(ctx, window)
  head = 2 * d * u.head_dim * (2 * u.group + 2) + 2 * 2 * u.group * u.head_dim * ctx
  neuron = 2 * d * (len(u.mlp_in) + 1)
  return float(head), float(neuron)


def block_flops(model: Model, params: Params, seq_len: int) -> float:
  """FLOPs per token of all blocks' heads and neurons (what `search`'s budget is a fraction of)."""
  u = units(model, params)
  head, neuron = unit_flops(model, params, seq_len)
  return head * sum(u.heads) + neuron * sum(u.neurons)


# Masks and Fisher importance ----------------------------------------------------------------------------------


def ones_masks(model: Model, params: Params) -> tuple[list[jax.Array], list[jax.Array]]:
  """All-ones masks: ([units_l] per layer, [width_l] per layer), float32."""
  u = units(model, params)
  return ([jnp.ones((n,), jnp.float32) for n in u.heads], [jnp.ones((n,), jnp.float32) for n in u.neurons])


def apply_masks(model: Model, params: Params, head_masks: Sequence[jax.Array], neuron_masks: Sequence[jax.Array]
                ) -> Params:
  """params with o_proj rows of unit h of layer l scaled by head_masks[l][h] and down_proj row j by
  neuron_masks[l][j]: the same function as masking each unit's output (biases stay). Differentiable in the
  masks. Kernels must be dense arrays."""
  u = units(model, params)
  rows = u.group * u.head_dim
  layers = _blocks(model, params)
  for i, (hm, nm) in enumerate(zip(head_masks, neuron_masks)):
    flat = dict(core.paths.flatten(layers[i]))
    wo, wd = flat[ATTN_O], flat[u.mlp_out]
    flat[ATTN_O] = wo * jnp.repeat(hm, rows).astype(wo.dtype)[:, None]
    flat[u.mlp_out] = wd * nm.astype(wd.dtype)[:, None]
    layers[i] = core.paths.replace(layers[i], flat)
  return {**params, model.block_path: _like(params[model.block_path], layers)}


def _blocks(model: Model, params: Params) -> list[Params]:
  container = params[model.block_path]
  return [container[i] for i in range(len(container))]


def _like(container, items: list):
  return type(container)(items) if isinstance(container, (list, tuple)) else {i: x for i, x in enumerate(items)}


LossFn = Callable[[Params, dict[str, jax.Array], jax.Array], jax.Array]


def fisher(model: Model, params: Params, batches: Sequence[dict[str, jax.Array]], loss_fn: LossFn, *,
           key: jax.Array | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Diagonal Fisher of every attention unit's and MLP neuron's mask: Σ over examples of (∂loss/∂m)² at m = 1.

  loss_fn(params, example, key) -> loss [] or losses [P] float: `example` is one row of a batch (every field
    [1, ...]); each of the P values (e.g. P sampled targets of the model's own output distribution, which gives
    the true rather than the empirical Fisher) adds its own squared gradient. The gradient of every example is
    taken separately (vmapped), as the Fisher needs.
  key: split per example and passed on (for sampled losses).
  Returns (per layer [units_l], per layer [width_l]) float64.
  """
  batches = check_batches(batches, 'fisher')
  key = jax.random.key(0) if key is None else key
  masks = ones_masks(model, params)

  def example_loss(m, example, k):
    one = jax.tree.map(lambda x: x[None], example)
    return jnp.atleast_1d(loss_fn(apply_masks(model, params, *m), one, k).astype(jnp.float32))

  @jax.jit
  def squared_grads(masks, batch, k):
    keys = jax.random.split(k, batch['tokens'].shape[0])
    jac = jax.vmap(jax.jacrev(example_loss), in_axes=(None, 0, 0))(masks, batch, keys)  # [B, P, units]
    return jax.tree.map(lambda g: jnp.sum(jnp.square(g), axis=(0, 1)), jac)

  total = None
  for b, batch in enumerate(batches):
    batch = {n: x for n, x in batch.items() if x is not None}
    sq = jax.tree.map(lambda x: np.asarray(x, np.float64), squared_grads(masks, batch, jax.random.fold_in(key, b)))
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(sq)):
      raise ValueError(f'fisher: calibration batch {b} gives a non-finite gradient; check its tokens, mask and '
                       'the loss (NaN inputs or an overflowing loss).')
    total = sq if total is None else jax.tree.map(np.add, total, sq)
  return list(total[0]), list(total[1])


def next_token_loss(model: Model) -> LossFn:
  """`fisher`'s loss for a causal LM: the summed next-token NLL of the example's tokens [1, T]."""
  from jaxcompress.eval import lm

  def loss(params, example, key):
    del key
    rows = example['tokens']
    return lm.token_nll(model.apply(params, rows[:, :-1]), rows[:, 1:]).sum()
  return loss


def embedding_loss(model: Model, probes: int = 4) -> LossFn:
  """`fisher`'s loss for an encoder without labels: the true Fisher of a Gaussian N(e, I) around the sentence
  embedding e. `probes` targets y ~ N(e, I) are drawn at the dense output; -log p(y) = ½‖y - e‖² has gradient
  -(y - e)ᵀJ = -zᵀJ, so each probe adds (zᵀJ)² and their mean is diag(JᵀJ) in expectation."""
  def loss(params, example, key):
    e = model.sentence_embedding(params, example['tokens'], example['attention_mask'])[0]
    z = jax.random.normal(key, (probes, e.shape[0]), e.dtype)
    return -(z @ e) / math.sqrt(probes)
  return loss


def check_batches(batches: Sequence[dict[str, Any]], fn: str) -> list[dict[str, Any]]:
  """Calibration batches as a list; refuses an empty list and floating arrays holding NaN or inf."""
  batches = list(batches)
  if not batches:
    raise ValueError(f'{fn}: no calibration batches; pass at least one dict with "tokens" [B, T].')
  for b, batch in enumerate(batches):
    if 'tokens' not in batch:
      raise ValueError(f'{fn}: calibration batch {b} has no "tokens" (keys: {sorted(batch)}).')
    for name, x in batch.items():
      x = np.asarray(x)
      if x.size == 0:
        raise ValueError(f'{fn}: calibration batch {b} field {name!r} is empty (shape {list(x.shape)}).')
      if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f'{fn}: calibration batch {b} field {name!r} holds NaN or inf; clean the data.')
  return batches


# Mask search --------------------------------------------------------------------------------------------------


def search(model: Model, params: Params, head_fisher: Sequence[np.ndarray], neuron_fisher: Sequence[np.ndarray], *,
           budget: float, seq_len: int, layers: Sequence[int] | None = None) -> Keep:
  """Kwon's FLOPs-constrained mask search: the units to keep so that the kept heads' and neurons' FLOPs are at
  most `budget` × the dense blocks' FLOPs (`block_flops`), maximising the summed Fisher of what is kept.

  Every unit of a kind costs the same, so for each head count h the best set is the h heads and the
  (budget - h·head_cost) / neuron_cost neurons of largest Fisher over all layers; the best h wins.
  layers: indices of the blocks that may be pruned (None: all); the others are kept whole, and their FLOPs
    count against the budget.
  """
  try:
    ok = 0 < float(budget) <= 1  # False for NaN
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'search: budget={budget!r} must be a fraction of the dense FLOPs in (0, 1], e.g. 0.6.')
  budget = float(budget)
  u = units(model, params)
  n_layers = len(u.heads)
  layers = _check_layers(layers, n_layers)
  head_cost, neuron_cost = unit_flops(model, params, seq_len)
  limit = budget * block_flops(model, params, seq_len)
  fixed = sum(head_cost * u.heads[i] + neuron_cost * u.neurons[i] for i in range(n_layers) if i not in layers)
  if fixed > limit:
    raise ValueError(f'search: the layers left whole ({sorted(set(range(n_layers)) - set(layers))}) alone cost '
                     f'{fixed / (limit / budget):.3f} of the dense FLOPs, above budget={budget}; prune more layers.')
  _check_scores(head_fisher, u.heads, 'head_fisher')
  _check_scores(neuron_fisher, u.neurons, 'neuron_fisher')
  # Candidates in prunable layers, best first (stable order: ties keep the lower layer and index).
  hs = [(float(f), i, j) for i in layers for j, f in enumerate(np.asarray(head_fisher[i]))]
  ns = [(float(f), i, j) for i in layers for j, f in enumerate(np.asarray(neuron_fisher[i]))]
  hs.sort(key=lambda t: -t[0])
  ns.sort(key=lambda t: -t[0])
  h_cum = np.concatenate([[0.0], np.cumsum([t[0] for t in hs])])
  n_cum = np.concatenate([[0.0], np.cumsum([t[0] for t in ns])])
  best = None
  for h in range(len(hs) + 1):
    room = limit - fixed - h * head_cost
    if room < 0:
      break
    n = min(len(ns), int(math.floor(room / neuron_cost + 1e-9)))
    score = h_cum[h] + n_cum[n]
    if best is None or score > best[0]:
      best = (score, h, n)
  _, h, n = best
  heads = [np.ones(k, bool) if i not in layers else np.zeros(k, bool) for i, k in enumerate(u.heads)]
  neurons = [np.ones(k, bool) if i not in layers else np.zeros(k, bool) for i, k in enumerate(u.neurons)]
  for _, i, j in hs[:h]:
    heads[i][j] = True
  for _, i, j in ns[:n]:
    neurons[i][j] = True
  return Keep(tuple(heads), tuple(neurons))


def _check_layers(layers: Sequence[int] | None, n: int) -> list[int]:
  if layers is None:
    return list(range(n))
  chosen = sorted({int(i) for i in layers if 0 <= int(i) < n})
  if not chosen:
    raise ValueError(f'layers={list(layers)!r} selects none of the model\'s {n} blocks (indices 0..{n - 1}).')
  bad = sorted({int(i) for i in layers} - set(chosen))
  if bad:
    raise ValueError(f'layers={list(layers)!r}: {bad} are not block indices of this {n}-block model.')
  return chosen


def _check_scores(scores: Sequence[np.ndarray], sizes: tuple[int, ...], name: str) -> None:
  if len(scores) != len(sizes) or any(np.shape(s) != (k,) for s, k in zip(scores, sizes)):
    raise ValueError(f'{name}: expected one score per unit with shapes {[(k,) for k in sizes]}, got '
                     f'{[np.shape(s) for s in scores]}.')
  if not all(np.isfinite(np.asarray(s)).all() for s in scores):
    raise ValueError(f'{name} holds NaN or inf; recompute it on clean calibration data.')


def keep_flops(model: Model, params: Params, keep: Keep, seq_len: int) -> float:
  """Fraction of the dense blocks' FLOPs that `keep` retains."""
  head, neuron = unit_flops(model, params, seq_len)
  kept = head * sum(int(k.sum()) for k in keep.heads) + neuron * sum(int(k.sum()) for k in keep.neurons)
  return kept / block_flops(model, params, seq_len)


def keep_masks(keep: Keep) -> tuple[list[jax.Array], list[jax.Array]]:
  """`Keep` as float masks for `apply_masks`."""
  return [jnp.asarray(k, jnp.float32) for k in keep.heads], [jnp.asarray(k, jnp.float32) for k in keep.neurons]


# Slicing ------------------------------------------------------------------------------------------------------


def slice_units(model: Model, params: Params, keep: Keep) -> tuple[Model, Params]:
  """Physically smaller params: per layer only the kept units' q/k/v columns and o rows, and the kept neurons'
  MLP input columns and output rows (biases sliced alike; o/down biases stay). The output equals
  `apply_masks(model, params, *keep_masks(keep))`'s. The spec is unchanged (sizes are read from the weights)."""
  u = units(model, params)
  if len(keep.heads) != len(u.heads) or len(keep.neurons) != len(u.neurons):
    raise ValueError(f'slice_units: keep has {len(keep.heads)} layers, the model {len(u.heads)}.')
  hd, g = u.head_dim, u.group
  layers = []
  for i in range(len(u.heads)):
    kh, kn = np.asarray(keep.heads[i], bool), np.asarray(keep.neurons[i], bool)
    if kh.shape != (u.heads[i],) or kn.shape != (u.neurons[i],):
      raise ValueError(f'slice_units: layer {i} keep shapes {kh.shape}, {kn.shape}; the layer has '
                       f'{u.heads[i]} units and {u.neurons[i]} neurons.')
    kv_cols = np.repeat(kh, hd)
    q_cols = np.repeat(np.repeat(kh, g), hd)
    block = model.block_params(params, i)
    flat = dict(core.paths.flatten(block))
    cols = {ATTN_Q: q_cols, ATTN_K: kv_cols, ATTN_V: kv_cols, **{p: kn for p in u.mlp_in}}
    for path, c in cols.items():
      flat[path] = _take(_dense(flat[path], path), c, axis=1)
      bias = path[:-len('kernel')] + 'bias'
      if bias in flat:
        flat[bias] = _take(flat[bias], c, axis=0)
    flat[ATTN_O] = _take(_dense(flat[ATTN_O], ATTN_O), q_cols, axis=0)
    flat[u.mlp_out] = _take(_dense(flat[u.mlp_out], u.mlp_out), kn, axis=0)
    layers.append(core.paths.replace(block, flat))
  return model, {**params, model.block_path: _like(params[model.block_path], layers)}


def _take(x, where: np.ndarray, axis: int) -> jax.Array:
  # On the host: slicing concrete weights once needs no compiled gather per shape.
  return jnp.asarray(np.compress(where, np.asarray(x), axis=axis))


def _dense(w, path: str):
  if not isinstance(w, jax.Array | np.ndarray):
    raise ValueError(f"slice_units: '{path}' is a {type(w).__name__}; structured pruning slices dense kernels "
                     '(prune structure before quantizing or sparsifying).')
  return w


def drop_layers(model: Model, params: Params, keep: Sequence[int]) -> tuple[Model, Params]:
  """Whole blocks removed: the model keeps blocks `keep` (in order) and its spec says so (num_layers)."""
  n = model.num_layers(params)
  keep = _check_layers(keep, n)
  blocks = [model.block_params(params, i) for i in keep]
  small = dataclasses.replace(model, config=dataclasses.replace(model.config, num_layers=len(keep)))
  return small, {**params, model.block_path: _like(params[model.block_path], blocks)}


# Least-squares tuning ------------------------------------------------------------------------------------------


def tune(model: Model, params: Params, small_model: Model, small: Params, batches: Sequence[dict[str, jax.Array]],
         *, damping: float = 1e-4, norm_metric: bool = True) -> Params:
  """Kwon's mask tuning on the sliced model, layer by layer and sublayer by sublayer.

  For each layer l, with x the dense model's input to it and x' the pruned model's (its tuned earlier layers
  included), the scales s of the kept attention units solve

      min_s Σ_tokens ‖ (x + attn(x)) - (x' + b_o + Σ_u s_u · X'_u W_o,u) ‖²

  (X'_u: unit u's attention output [tokens, group·hd] in the pruned model, W_o,u its o_proj rows), and then the
  MLP neuron scales solve the same with the MLP's residual sum. Padding tokens are excluded. The normal
  equations G s = c are accumulated over the batches (G = Σ blocks of (XᵀX) ∘ (W Wᵀ)) and solved in float64
  with a ridge towards s = 1 of damping · mean(diag G) (`solve_scales`); damping=0 gives the least-squares
  solution itself.
  norm_metric: in a post-norm block (BERT) measure the residual error as the LayerNorm after it sees it, to
    first order: centred over the features, times the norm's scale, over each token's standard deviation (of
    the dense sum). Otherwise a few huge-norm tokens and outlier features that the norm divides away dominate
    the fit. Without it (or in a pre-norm block) the plain residual error above.
  s is folded into o_proj / down_proj rows.
  """
  _check_family(model)
  batches = check_batches(batches, 'tune')
  if model.num_layers(params) != small_model.num_layers(small):
    raise ValueError('tune: the pruned model has a different number of blocks; tune heads and neurons before '
                     'dropping whole blocks.')
  u = units(small_model, small)
  post_norm = model.family == 'bert'
  ctxs = [model.context(b['tokens'], attention_mask=b.get('attention_mask')) for b in batches]
  weights = [jnp.ones(b['tokens'].shape, jnp.float32) if b.get('attention_mask') is None
             else jnp.asarray(b['attention_mask'], jnp.float32) for b in batches]
  embed = jax.jit(lambda p, tokens, types: model.embed(p, tokens, token_types=types))
  h_dense = [embed(params, b['tokens'], b.get('token_types')) for b in batches]
  h_small = list(h_dense)
  layers = _blocks(small_model, small)
  rows = u.group * u.head_dim

  @jax.jit
  def sublayer_sums(bp, h, ctx):
    """(attention residual sum, MLP input h1, MLP residual sum, o_proj input, down_proj input, block output)."""
    out, x = model.block_linear_inputs(bp, h, ctx)
    flat = core.paths.flatten(bp)
    s_a = h + _linear(x[ATTN_O], flat, ATTN_O)
    h1 = x[u.mlp_in[0]] if post_norm else s_a
    s_m = h1 + _linear(x[u.mlp_out], flat, u.mlp_out)
    return s_a, h1, s_m, x[ATTN_O], x[u.mlp_out], out

  @jax.jit
  def normal_eq(x, w, target, base, weight, gamma):
    """G = (XᵀX) ∘ (W Wᵀ), c = Σ_tokens X ∘ ((target - base) Wᵀ), padding weighted out; with gamma [D] (the
    norm metric) W and the residual are centred over features and scaled by gamma, each token by 1/std."""
    d = target.shape[-1]
    t32 = target.reshape(-1, d).astype(jnp.float32)
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32) * weight.reshape(-1, 1)
    r = t32 - base.reshape(-1, d).astype(jnp.float32)
    w = w.astype(jnp.float32)
    if gamma is not None:
      inv_std = jax.lax.rsqrt(jnp.var(t32, axis=-1, keepdims=True) + 1e-6)
      x, r = x * inv_std, (r - r.mean(-1, keepdims=True)) * gamma * inv_std
      w = (w - w.mean(-1, keepdims=True)) * gamma
    hp = jax.lax.Precision.HIGHEST
    return (jnp.dot(x.T, x, precision=hp) * jnp.dot(w, w.T, precision=hp),
            jnp.sum(x * jnp.dot(r, w.T, precision=hp), axis=0))

  for i in range(model.num_layers(params)):
    dense_bp = model.block_params(params, i)
    dense = [sublayer_sums(dense_bp, h, c) for h, c in zip(h_dense, ctxs)]
    for part, kernel, size in (('attn', ATTN_O, rows), ('mlp', u.mlp_out, 1)):
      flat = dict(core.paths.flatten(layers[i]))
      if core.shape_of(flat[kernel])[0] == 0:
        continue
      g, c = None, None
      for b, (h, ctx) in enumerate(zip(h_small, ctxs)):
        s_a, h1, _, x_o, x_d, _ = sublayer_sums(layers[i], h, ctx)
        target, base, x = ((dense[b][0], h, x_o) if part == 'attn' else (dense[b][2], h1, x_d))
        base = base + _bias(flat, kernel, base.dtype)
        gamma = None
        if post_norm and norm_metric:
          gamma = core.materialize(flat[('attn_norm' if part == 'attn' else 'mlp_norm') + '/scale']).astype(jnp.float32)
        gb, cb = normal_eq(x, flat[kernel], target, base, weights[b], gamma)
        g = gb if g is None else g + gb
        c = cb if c is None else c + cb
      scales = solve_scales(np.asarray(g, np.float64), np.asarray(c, np.float64), size, damping)
      w = np.asarray(flat[kernel])
      flat[kernel] = jnp.asarray((w * np.repeat(scales, size)[:, None]).astype(w.dtype))
      layers[i] = core.paths.replace(layers[i], flat)
    h_small = [sublayer_sums(layers[i], h, c)[5] for h, c in zip(h_small, ctxs)]
    h_dense = [d[5] for d in dense]
  return {**small, model.block_path: _like(small[model.block_path], layers)}


def _linear(x, flat, kernel):
  y = core.linear(x, flat[kernel], None)
  return y + _bias(flat, kernel, y.dtype)


def _bias(flat, kernel, dtype):
  b = flat.get(kernel[:-len('kernel')] + 'bias')
  return 0.0 if b is None else core.materialize(b).astype(dtype)


def solve_scales(g: np.ndarray, c: np.ndarray, size: int, damping: float) -> np.ndarray:
  """Unit scales from per-column normal equations: G [n·size, n·size] and c [n·size] summed over each unit's
  `size` columns, then (G_u + λ·I) s = c_u + λ, λ = damping · mean(diag G_u), solved by least squares in
  float64: a ridge that pulls the scales towards 1 (damping=0: the plain least-squares solution)."""
  n = g.shape[0] // size
  gu = g.reshape(n, size, n, size).sum(axis=(1, 3))
  cu = c.reshape(n, size).sum(axis=1)
  if damping:  # ridge towards 1 (the unpruned scale), not towards 0
    lam = damping * max(float(np.mean(np.diag(gu))), 1e-30)
    gu, cu = gu + lam * np.eye(n), cu + lam
  s = np.linalg.lstsq(gu, cu, rcond=None)[0]
  if not np.isfinite(s).all():
    raise ValueError('tune: the least-squares scales are not finite; the calibration data gives degenerate '
                     'statistics (raise damping).')
  return s


# Saving --------------------------------------------------------------------------------------------------------


def layer_widths(model: Model, params: Params) -> dict[str, list[int]]:
  """{'heads': query heads per layer, 'kv_heads': key/value heads per layer, 'intermediate': MLP width}."""
  u = units(model, params)
  return {'heads': [h * u.group for h in u.heads], 'kv_heads': list(u.heads), 'intermediate': list(u.neurons)}


def is_narrowed(model: Model, params: Params) -> bool:
  """Whether any layer has fewer heads or a narrower MLP than the config says (an HF config cannot express it)."""
  if model.family not in SUPPORTED:
    return False
  w = layer_widths(model, params)
  return (any(h != model.config.num_heads for h in w['heads'])
          or any(n != model.config.intermediate_size for n in w['intermediate']))


def save(directory: str | os.PathLike, model: Model, params: Params) -> Path:
  """A narrowed model as `directory/config.json` (the HF config of the spec plus the field
  `jaxcompress_layer_widths` with per-layer head counts and MLP widths) and `directory/params.safetensors`
  (`core.serialize`). Only `load` reads it: transformers cannot express per-layer widths (use `pad_to_dense`
  and `models.save_pretrained` for a checkpoint transformers loads)."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  cfg = model.hf_config().to_dict()
  cfg[WIDTHS_FIELD] = layer_widths(model, params)
  (directory / 'config.json').write_text(json.dumps(cfg, indent=1, default=str))
  core.serialize.save(directory / 'params.safetensors', params)
  return directory


def load(directory: str | os.PathLike) -> tuple[Model, Params]:
  """(model, params) written by `save`; checks the weights against the per-layer widths in config.json."""
  from jaxcompress import models
  directory = Path(directory)
  cfg = json.loads((directory / 'config.json').read_text())
  if WIDTHS_FIELD not in cfg:
    raise ValueError(f"'{directory / 'config.json'}' has no {WIDTHS_FIELD!r} field; it was not written by "
                     'jaxcompress.pruning._src.structured.save (load it with models.from_pretrained).')
  import transformers
  widths = cfg.pop(WIDTHS_FIELD)
  hf = transformers.AutoConfig.for_model(**cfg)
  model = models.supported_model_types()[hf.model_type].from_hf_config(hf)
  params = core.serialize.load(directory / 'params.safetensors')
  found = layer_widths(model, params)
  if found != widths:
    raise ValueError(f"'{directory}': the weights' per-layer widths {found} differ from config.json's {widths}.")
  return model, params


def pad_to_dense(model: Model, params: Params, keep: Keep) -> Params:
  """The inverse of `slice_units` for export: pruned units filled with zeros back to the dense shapes (the
  function is unchanged), so `models.save_pretrained` writes a checkpoint transformers loads. No size is saved.

  keep: the `Keep` that `slice_units` applied.
  """
  u = units(model, params)
  hd, g = u.head_dim, u.group
  layers = []
  for i in range(len(u.heads)):
    kh, kn = np.asarray(keep.heads[i], bool), np.asarray(keep.neurons[i], bool)
    if int(kh.sum()) != u.heads[i] or int(kn.sum()) != u.neurons[i]:
      raise ValueError(f'pad_to_dense: layer {i} has {u.heads[i]} units and {u.neurons[i]} neurons, keep says '
                       f'{int(kh.sum())} and {int(kn.sum())}.')
    kv_cols, q_cols = np.repeat(kh, hd), np.repeat(np.repeat(kh, g), hd)
    block = model.block_params(params, i)
    flat = dict(core.paths.flatten(block))
    for path, c in {ATTN_Q: q_cols, ATTN_K: kv_cols, ATTN_V: kv_cols, **{p: kn for p in u.mlp_in}}.items():
      flat[path] = _scatter(flat[path], c, axis=1)
      bias = path[:-len('kernel')] + 'bias'
      if bias in flat:
        flat[bias] = _scatter(flat[bias], c, axis=0)
    flat[ATTN_O] = _scatter(flat[ATTN_O], q_cols, axis=0)
    flat[u.mlp_out] = _scatter(flat[u.mlp_out], kn, axis=0)
    layers.append(core.paths.replace(block, flat))
  return {**params, model.block_path: _like(params[model.block_path], layers)}


def _scatter(x, where: np.ndarray, axis: int) -> jax.Array:
  x = np.asarray(x)
  shape = list(x.shape)
  shape[axis] = where.size
  out = np.zeros(shape, x.dtype)
  if axis == 0:
    out[where] = x
  else:
    out[:, where] = x
  return jnp.asarray(out)


# The method ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredConfig:
  flops: float = 0.6  # kept fraction of the blocks' head and neuron FLOPs, in (0, 1]
  tune: bool = True  # least-squares scales of the kept units (Kwon's mask tuning)
  probes: int = 4  # encoders: sampled targets per sentence of the embedding Fisher


def structured(model: Model, params: Params, calib, *, config: StructuredConfig = StructuredConfig(),
               key: jax.Array | None = None) -> tuple[Model, Params]:
  """Kwon et al.: Fisher of head and neuron masks on the calibration rows, the FLOPs-budget search, slicing,
  then least-squares tuning. The result has physically narrower layers (a new model with per-layer widths).

  calib: a `registry.Context` or a list of calibration batches {'tokens' [B, T], 'attention_mask' [B, T]}.
  key: the Fisher's sampled targets (encoders); None: the context's key of 'structured'.
  """
  if getattr(model.config, 'online_hadamard', 0):
    raise ValueError(f'structured pruning: the model rotates its MLP input online (online_hadamard='
                     f'{model.config.online_hadamard}), over every neuron; prune neurons before quarot(online=True).')
  ctx = registry.as_context(calib)
  cfg = config
  batches = ctx.batches()
  key = ctx.key('structured') if key is None else key
  loss = next_token_loss(model) if model.causal else embedding_loss(model, cfg.probes)
  heads, neurons = fisher(model, params, batches, loss, key=key)
  seq_len = int(batches[0]['tokens'].shape[1])
  keep = search(model, params, heads, neurons, budget=cfg.flops, seq_len=seq_len)
  small_model, small = slice_units(model, params, keep)
  if cfg.tune:
    tune_batches = [{**b, 'tokens': b['tokens'][:, :-1]} if model.causal else b for b in batches]
    small = tune(model, params, small_model, small, tune_batches)
  return small_model, small


registry.register('structured', StructuredConfig, structured, family='pruning',
                  forbids=registry.COMPRESSED + ('architecture',), adds='architecture', calibrated=True,
                  paper='Kwon et al., "A Fast Post-Training Pruning Framework for Transformers" (NeurIPS 2022): '
                  'heads and neurons to a FLOPs budget, physically smaller layers')
