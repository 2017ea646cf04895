"""Cross-layer parameter sharing (Lan et al., "ALBERT", ICLR 2020): blocks of a group use one set of weights.

A grouping is a tuple of groups of block indices, e.g. ((0, 1), (2, 3)). `share_blocks` stores each group's
weights once under `params['_shared']` (averaged over the group, so a pretrained model starts close to itself)
and leaves `core.Shared` references in every block: autodiff sums every use's gradient into the one storage,
and checkpoints, `core.serialize` and `core.stats` count it once.

    groups = sharing.consecutive_groups(4, 2)                     # ((0, 1), (2, 3))
    shared = sharing.share_blocks(params, groups)                # averaged, tied
    shared = sharing.add_deltas(shared, key, rank=8)             # per-layer LoRA deltas over shared storage
    model, shared = sharing.share(model, params, None, config=sharing.ShareConfig(group=2))  # the method

`add_deltas` is relaxed recursive sharing (Bae et al., "Relaxed recursive transformers", 2024): each place keeps
its own small `core.LoRA(base=Shared(...), a, b)` adapter, so layers of a group may differ again cheaply.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.train import state as state_lib

Groups = tuple[tuple[int, ...], ...]
# Train only the per-layer deltas (the shared storage fixed).
DELTA_TRAINABLE = state_lib.matching(r'/lora_(a|b)$')


def all_blocks(num_layers: int) -> Groups:
  """ALBERT: every block in one group."""
  return (tuple(range(num_layers)),)


def consecutive_groups(num_layers: int, k: int) -> Groups:
  """Groups of k consecutive blocks (the last may be shorter)."""
  if not 1 <= k <= num_layers:
    raise ValueError(f'consecutive_groups: k={k} must be in [1, num_layers={num_layers}].')
  return tuple(tuple(range(i, min(i + k, num_layers))) for i in range(0, num_layers, k))


def _blocks(params: dict, block_path: str) -> dict:
  if block_path not in params:
    raise KeyError(f"no '{block_path}' in params (top-level keys {sorted(map(str, params))}); pass block_path=.")
  return params[block_path]


def _block_weights(params: dict, i: int, block_path: str, within_block: str) -> dict[str, Any]:
  """{subpath within block i: weight} for the subpaths the regex `within_block` matches (re.search)."""
  blocks = _blocks(params, block_path)
  key = i if i in blocks else str(i)
  if key not in blocks:
    raise KeyError(f'block {i} does not exist: {block_path} has blocks {sorted(int(k) for k in blocks)}.')
  rx = re.compile(within_block)
  return {p: w for p, w in core.flatten(blocks[key]).items() if rx.search(p)}


def _check_groups(params: dict, groups: Sequence[Sequence[int]], block_path: str, within_block: str) -> Groups:
  n = len(_blocks(params, block_path))
  seen: set[int] = set()
  for g in groups:
    if not g:
      raise ValueError(f'share_blocks: empty group in {groups}; each group names at least one block.')
    for i in g:
      if not 0 <= int(i) < n:
        raise ValueError(f'share_blocks: block {i} in group {tuple(g)} does not exist; the model has blocks '
                         f'0..{n - 1}.')
      if i in seen:
        raise ValueError(f'share_blocks: block {i} appears in two groups of {groups}; groups must be disjoint.')
      seen.add(int(i))
    ref = _block_weights(params, g[0], block_path, within_block)
    for i in g[1:]:
      other = _block_weights(params, i, block_path, within_block)
      if set(other) != set(ref):
        raise ValueError(f'share_blocks: blocks {g[0]} and {i} hold different weights '
                         f'({sorted(set(ref) ^ set(other))[:3]}); only identical blocks can share.')
      for p in ref:
        if core.shape_of(ref[p]) != core.shape_of(other[p]):
          raise ValueError(f"share_blocks: '{p}' has shape {core.shape_of(ref[p])} in block {g[0]} but "
                           f'{core.shape_of(other[p])} in block {i}; only same-shaped layers can share.')
  return tuple(tuple(int(i) for i in g) for g in groups)


def share_blocks(params: dict, groups: Sequence[Sequence[int]], *, block_path: str = 'layers',
                 within_block: str = r'.', average: bool = True) -> dict:
  """params with the weights of each group's blocks stored once (groups of one block are left as they are).

  within_block: regex over paths inside a block ('attn/q_proj/kernel'): which of a block's weights its group
    ties; default every weight (ALBERT shares norms too). Not a `core.Rules` selection: the same subpath is tied
    across the group's blocks, so it names places within one block, not paths of the model.
  average: initialise the storage with the group's mean (False: the first block's weights).
  Storage names are 'g<first>-<last>:<subpath>' ('g0-3:mlp/up_proj/kernel' for blocks 0..3).
  """
  groups = _check_groups(params, groups, block_path, within_block)
  out = params
  for g in groups:
    if len(g) < 2:
      continue
    ref = _block_weights(params, g[0], block_path, within_block)
    for sub in ref:
      members = [core.materialize(_block_weights(params, i, block_path, within_block)[sub]) for i in g]
      value = jnp.mean(jnp.stack(members), axis=0).astype(members[0].dtype) if average else members[0]
      out = core.tie(out, [f'{block_path}/{i}/{sub}' for i in g], name=f'g{g[0]}-{g[-1]}:{sub}', value=value)
  return out


def flat_block(params: dict, i: int, *, block_path: str = 'layers', within_block: str = r'kernel$') -> np.ndarray:
  """Block i's selected weights, flattened and concatenated (float64), for similarity."""
  ws = _block_weights(core.resolve(params), i, block_path, within_block)
  return np.concatenate([np.asarray(core.materialize(w), np.float64).ravel() for _, w in sorted(ws.items())])


def similarity(params: dict, *, block_path: str = 'layers', within_block: str = r'kernel$') -> np.ndarray:
  """Cosine similarity [L, L] float64 of the blocks' flattened weights."""
  n = len(_blocks(params, block_path))
  flat = np.stack([flat_block(params, i, block_path=block_path, within_block=within_block) for i in range(n)])
  flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-300)
  return flat @ flat.T


def similarity_groups(params: dict, num_groups: int, *, block_path: str = 'layers', within_block: str = r'kernel$',
                      method: str = 'agglomerative') -> Groups:
  """Blocks grouped by cosine similarity of their weights into `num_groups` groups.

  method: 'agglomerative' (average linkage: repeatedly merge the two groups of highest mean pairwise cosine)
    or 'greedy' (visit blocks in order; a block joins the most similar open group, by its first block, when
    that similarity is above the mean similarity of all pairs of distinct blocks or no group may be opened,
    and opens a group otherwise; the last blocks open groups while groups are missing).
  """
  sim = similarity(params, block_path=block_path, within_block=within_block)
  n = len(sim)
  if not 1 <= num_groups <= n:
    raise ValueError(f'similarity_groups: num_groups={num_groups} must be in [1, {n}] (the number of blocks).')
  if method == 'agglomerative':
    groups = [[i] for i in range(n)]
    while len(groups) > num_groups:
      best, pair = -np.inf, (0, 1)
      for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
          s = float(np.mean(sim[np.ix_(groups[a], groups[b])]))
          if s > best:
            best, pair = s, (a, b)
      a, b = pair
      groups[a] = sorted(groups[a] + groups[b])
      del groups[b]
  elif method == 'greedy':
    groups = []
    typical = float((sim.sum() - np.trace(sim)) / max(n * (n - 1), 1))  # mean similarity of distinct blocks
    for i in range(n):
      must_open = n - i <= num_groups - len(groups)
      if groups and (len(groups) == num_groups or not must_open):
        scores = [sim[i, g[0]] for g in groups]
        if len(groups) == num_groups or max(scores) > typical:
          groups[int(np.argmax(scores))].append(i)
          continue
      groups.append([i])
  else:
    raise ValueError(f"similarity_groups: method={method!r}; choose 'agglomerative' or 'greedy'.")
  return tuple(sorted(tuple(g) for g in groups))


def add_deltas(params: dict, key: jax.Array, *, rank: int = 4, alpha: float | None = None,
               include: str = r'kernel$') -> dict:
  """Every place that holds a `Shared` reference matching `include` gets its own LoRA delta over it.

  a: [in, rank] ~ N(0, 1/in), b: [rank, out] = 0 (the model is unchanged at first), scale = alpha / rank
  (default alpha = rank: scale 1).
  """
  if rank < 1:
    raise ValueError(f'add_deltas: rank={rank} must be >= 1.')
  rx = re.compile(include)
  flat = core.flatten(params)
  places = [p for p, w in flat.items() if isinstance(w, core.Shared) and rx.search(p)]
  if not places:
    raise ValueError(f'add_deltas: no Shared reference matches include={include!r}; share blocks first '
                     '(share_blocks) or widen include.')
  keys = dict(zip(places, jax.random.split(key, len(places))))
  updates = {}
  for p in places:
    d_in, d_out = core.shape_of(flat[p])
    if rank > min(d_in, d_out):
      raise ValueError(f"add_deltas: rank={rank} exceeds min(in, out)={min(d_in, d_out)} at '{p}'.")
    a = jax.random.normal(keys[p], (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
    updates[p] = core.LoRA(base=flat[p], lora_a=a, lora_b=jnp.zeros((rank, d_out), jnp.float32),
                           scale=(alpha or rank) / rank)
  return core.paths.replace(params, updates)


# The method ----------------------------------------------------------------------------------------------------

@registry.retired(include="the regex over paths inside a block is within_block= (e.g. within_block='mlp/')")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ShareConfig:
  """Which blocks share (`group`, `by`) and which of their weights (`within_block`).

  `within_block` is a regex over paths *inside* a block ('mlp/up_proj/kernel'), not a `core.Rules` selection of
  model paths: each subpath it matches is tied across the blocks of a group, so it names places within one block.
  It keeps its own name so that it never reads as the `include=` every selecting method takes.
  """

  group: int = registry.field(2, range='[1, inf)')  # consecutive blocks per shared group (ALBERT: all of them)
  within_block: str = '.'  # regex over paths inside a block whose weights are tied ('mlp/' shares only the MLPs)
  average: bool = True  # the shared storage starts as the group's mean (False: the first block's weights)
  lora_rank: int = 0  # > 0: each block's shared kernels get their own LoRA delta of this rank (train with distill)
  by: str = 'consecutive'  # grouping: 'consecutive' blocks, or by weight cosine: 'agglomerative' / 'greedy'

  def __post_init__(self):
    if self.lora_rank < 0:
      raise ValueError(f'lora_rank={self.lora_rank} must be >= 0 (0: no per-block deltas).')
    if self.by not in ('consecutive', 'agglomerative', 'greedy'):
      raise ValueError(f"by={self.by!r}; choose 'consecutive', 'agglomerative' or 'greedy'.")


def share(model: Any, params: dict, calib: Any = None, *, config: ShareConfig = ShareConfig(),
          key: jax.Array | None = None) -> tuple[Any, dict]:
  """The model's blocks in groups of config.group share one stored copy of their weights (`share_blocks`); with
  lora_rank > 0 each place gets its own LoRA delta over the storage (`add_deltas`, a [in, r] drawn from `key`;
  None: calib.key('share')). The model spec is unchanged."""
  n = model.num_layers(params)
  if config.by == 'consecutive':
    groups = consecutive_groups(n, config.group)
  else:  # as many groups as consecutive sharing would make, chosen by the similarity of the blocks' kernels
    groups = similarity_groups(params, -(-n // config.group), block_path=model.block_path, method=config.by)
  out = share_blocks(params, groups, block_path=model.block_path, within_block=config.within_block,
                     average=config.average)
  if config.lora_rank:  # relaxed recursive sharing (Bae et al. 2024): a per-place low-rank delta over the storage
    key = registry.as_context(calib).key('share') if key is None else key
    out = add_deltas(out, key, rank=config.lora_rank)
  return model, out


registry.register('share', ShareConfig, share, family='sharing', forbids=registry.COMPRESSED + ('architecture',),
                  adds='shared', paper='Lan et al., "ALBERT" (ICLR 2020): cross-layer sharing of consecutive blocks; '
                  'lora_rank: Bae et al., "Relaxed Recursive Transformers" (2024)')
