"""Pruning during training: a sparsity schedule and the methods that follow it inside `train.loop.fit`.

    gradual_magnitude(config)       a Transform: every `frequency` steps, prune the smallest |W| to the
                                    cubic schedule's sparsity (Zhu & Gupta, "To prune, or not to prune", 2017):
                                        s_t = s_f + (s_i - s_f) · (1 - (t - t_0) / (t_1 - t_0))³
    sparse_optimizer(tx, config)    an optax wrapper for dynamic sparse training, whose regrowth needs gradients
                                    (which a Transform never sees): SET (Mocanu et al. 2018) and RigL (Evci et
                                    al. 2020) at constant sparsity (drop the smallest |W|, regrow at random / by
                                    |∂L/∂W|, the drop fraction decaying with a cosine), starting from a random
                                    mask (init='random', the papers' training from scratch) or, for a pretrained
                                    model, from the magnitude mask at the target sparsity (init='magnitude', as
                                    jaxpruner does for fine-tuning: a random 70% mask throws most of what was
                                    learned away at step 0).

Both keep masks as explicit state (checkpointed with the run); `as_masked(params, masks)` turns the trained
params into `core.Masked` leaves at the end (masks: the Transform's state, or `sparse_masks(opt_state)`).
`sparse_optimizer` zeroes pruned parameters through its own updates (update = -W where the mask is off), so it
needs no Transform; entries regrown by RigL / SET start from zero as in the papers. Movement pruning (hard and
soft), which keeps the weights whole, is `movement.py`. Recovery fine-tuning with masks frozen needs neither:
`core.Masked` leaves keep their zeros under any optimizer (or pair `masked_optimizer` with `keep_masks` for dense
leaves).

The methods `gradual`, `set` and `rigl` fine-tune a model on calib.train (`train.recovery.fit`) with these pieces
and return `core.Masked` block kernels:

    model, params = pruning.gradual(model, params, ctx, config=pruning.GradualPruneConfig(sparsity=0.7))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxcompress import core, registry
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src import masks as masks_lib
from jaxcompress.train import recovery, transforms


def cubic_sparsity(step: jax.Array, *, initial: float, final: float, begin_step: int, end_step: int) -> jax.Array:
  """Zhu & Gupta's schedule: `initial` before begin_step, `final` from end_step on, cubic in between."""
  t = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / max(end_step - begin_step, 1), 0.0, 1.0)
  return final + (initial - final) * (1.0 - t) ** 3


def _prune_lowest(score: jax.Array, sparsity: jax.Array) -> jax.Array:
  """Kept mask pruning round(sparsity · size) lowest scores of the whole array (sparsity traced)."""
  flat = score.reshape(-1)
  k = jnp.round(sparsity * flat.size).astype(jnp.int32)
  ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  return (ranks >= k).reshape(score.shape)


def _selected_masks(params: Any, rules: core.Rules, *, caller: str) -> Any:
  """A tree like params: all-True bool arrays at the kernels `rules` select, None elsewhere."""
  sel = core.select_by(params, rules)
  if not len(sel):
    raise ValueError(f'{caller}: include={rules.include!r} exclude={rules.exclude!r} selects no parameter; see '
                     'core.select(params) for the paths.')
  chosen = frozenset(sel)  # (`set` in this module is the method)
  return core.map_with_path(lambda p, x: jnp.ones(core.shape_of(x), bool) if p in chosen else None, params)


def _zip(fn, masks, *trees):
  """fn(mask, *leaves) where masks has an array, None where it has None."""
  return jax.tree.map(lambda m, *xs: None if m is None else fn(m, *xs), masks, *trees, is_leaf=lambda x: x is None)


def _apply(masks, tree):
  return jax.tree.map(lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros_like(x)), masks, tree,
                      is_leaf=lambda x: x is None)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualConfig:
  final_sparsity: float = 0.5  # sparsity of every selected kernel from end_step on
  initial_sparsity: float = 0.0  # sparsity at begin_step
  begin_step: int = 0  # first pruning step
  end_step: int = 1000  # last pruning step (the schedule reaches final_sparsity here)
  frequency: int = 100  # steps between mask updates
  rules: core.Rules = core.Rules()  # which kernels are pruned (default: every kernel but the output heads')


def _check_schedule(cfg, caller: str):
  masks_lib.check_sparsity(cfg.final_sparsity, caller=f'{caller} final_sparsity')
  masks_lib.check_sparsity(cfg.initial_sparsity, caller=f'{caller} initial_sparsity')
  if not (0 <= cfg.begin_step <= cfg.end_step and cfg.frequency >= 1):
    raise ValueError(f'{caller}: need 0 <= begin_step ({cfg.begin_step}) <= end_step ({cfg.end_step}) and '
                     f'frequency >= 1 ({cfg.frequency}).')


def gradual_magnitude(config: GradualConfig = GradualConfig()) -> transforms.Transform:
  """A Transform pruning the selected kernels by |W| to the cubic schedule; state: the masks (a tree like the
  params, None where unpruned). Pruned entries stay pruned (their score is below every kept one)."""
  _check_schedule(config, 'gradual_magnitude')
  c = config

  def init(params):
    return _selected_masks(params, c.rules, caller='gradual_magnitude')

  def update(params, masks, step, rng):
    del rng
    # end_step too, so the final sparsity is reached whatever the frequency
    due = (step >= c.begin_step) & (step <= c.end_step) & (((step - c.begin_step) % c.frequency == 0) |
                                                           (step == c.end_step))
    s = cubic_sparsity(step, initial=c.initial_sparsity, final=c.final_sparsity, begin_step=c.begin_step,
                       end_step=c.end_step)

    def recompute(masks):
      return _zip(lambda m, w: _prune_lowest(jnp.where(m, jnp.abs(w.astype(jnp.float32)), -1.0), s), masks, params)

    masks = lax.cond(due, recompute, lambda m: m, masks)
    return _apply(masks, params), masks

  return transforms.Transform(init=init, update=update)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseTrainingConfig:
  method: str = 'rigl'  # 'rigl' | 'set' (both at constant sparsity)
  sparsity: float = 0.5  # sparsity of every selected kernel, from step 0
  init: str = 'random'  # initial masks: 'random' (from scratch, as the papers) | 'magnitude' (largest |W|: pretrained)
  rules: core.Rules = core.Rules()  # which kernels are made sparse (default: every kernel but the output heads')
  update_every: int = 100  # optimizer steps between mask updates
  end_step: int = 1000  # last mask update
  drop_fraction: float = 0.3  # fraction of kept weights replaced at the first update (cosine decay)
  seed: int = 0  # the initial random masks (init='random'); set: where weights regrow


class SparseState(NamedTuple):
  masks: Any  # tree like the params: bool arrays at the sparse kernels, None elsewhere
  count: jax.Array  # int32 optimizer steps taken
  inner: optax.OptState


def sparse_optimizer(tx: optax.GradientTransformation, config: SparseTrainingConfig = SparseTrainingConfig()
                     ) -> optax.GradientTransformation:
  """tx with sparse kernels (see module docstring); needs `params` in update (optax passes them in loop.fit)."""
  c = config
  if c.method not in ('rigl', 'set'):
    raise ValueError(f"sparse_optimizer: method={c.method!r} must be 'rigl' or 'set' (movement pruning is "
                     'pruning.movement).')
  if c.init not in ('random', 'magnitude'):
    raise ValueError(f"sparse_optimizer: init={c.init!r} must be 'random' (from scratch) or 'magnitude' "
                     '(a pretrained model).')
  masks_lib.check_sparsity(c.sparsity, caller='sparse_optimizer')
  if not (0 < c.drop_fraction < 1) or c.update_every < 1 or c.end_step < 0:
    raise ValueError(f'sparse_optimizer: need 0 < drop_fraction < 1 ({c.drop_fraction}), update_every >= 1 '
                     f'({c.update_every}), end_step >= 0 ({c.end_step}).')

  def init(params):
    masks = _selected_masks(params, c.rules, caller='sparse_optimizer')
    if c.init == 'magnitude':  # the largest |W| of each kernel: what a pretrained model already relies on
      masks = _zip(lambda m, w: _prune_lowest(jnp.abs(w.astype(jnp.float32)), c.sparsity), masks, params)
    else:  # a random mask, as both papers begin from scratch
      leaves, treedef = jax.tree.flatten(masks)
      keys = jax.random.split(jax.random.key(c.seed), max(len(leaves), 1))
      leaves = [_prune_lowest(jax.random.uniform(k, m.shape), c.sparsity) for k, m in zip(keys, leaves)]
      masks = jax.tree.unflatten(treedef, leaves)
    return SparseState(masks, jnp.zeros((), jnp.int32), tx.init(params))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError('sparse_optimizer: update needs params (optax.apply_updates callers pass them).')
    count = state.count + 1
    updates, inner = tx.update(grads, state.inner, params)
    due = (count <= c.end_step) & (count % c.update_every == 0)
    frac = c.drop_fraction / 2 * (1 + jnp.cos(math.pi * jnp.minimum(count, c.end_step) / max(c.end_step, 1)))
    key = jax.random.fold_in(jax.random.key(c.seed), count)

    def regrow(masks):
      leaves, treedef = jax.tree.flatten(masks)
      keys = jax.random.split(key, max(len(leaves), 1))
      tree_keys = jax.tree.unflatten(treedef, list(keys))
      return _zip(lambda m, k, g, w, u: _drop_and_grow(m, w + u, g, k, frac, c.method), masks, tree_keys,
                  grads, params, updates)

    new = lax.cond(due, regrow, lambda m: m, state.masks)
    # Kept-and-kept entries take tx's update; the others go (or stay) exactly to zero: -W + W = 0.
    updates = jax.tree.map(lambda m, old, u, w: u if m is None else jnp.where(m & old, u, -w), new, state.masks,
                           updates, params, is_leaf=lambda x: x is None)
    return updates, SparseState(new, count, inner)

  return optax.GradientTransformation(init, update)


def _drop_and_grow(mask, w, g, key, frac, method):
  """Drop the round(frac · kept) smallest |w| among kept entries, regrow as many among the others (RigL: largest
  |g|; SET: at random); the number kept stays the same."""
  kept = jnp.sum(mask)
  k = jnp.round(frac * kept).astype(jnp.int32)
  drop_score = jnp.where(mask, jnp.abs(w), jnp.inf).reshape(-1)
  drop_rank = jnp.argsort(jnp.argsort(drop_score, stable=True), stable=True)
  after_drop = mask.reshape(-1) & (drop_rank >= k)
  grow = jnp.abs(g).reshape(-1).astype(jnp.float32) if method == 'rigl' else jax.random.uniform(key, (mask.size,))
  grow_score = jnp.where(after_drop, -jnp.inf, grow)
  grow_rank = jnp.argsort(jnp.argsort(-grow_score, stable=True), stable=True)
  return (after_drop | (grow_rank < k)).reshape(mask.shape)


def sparse_masks(opt_state: Any) -> Any:
  """The masks of the `SparseState` inside an optimizer state (sparse_optimizer's, possibly chained)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
           if isinstance(s, SparseState)]
  if len(found) != 1:
    raise ValueError(f'sparse_masks: the optimizer state holds {len(found)} SparseState(s); expected the one of '
                     'sparse_optimizer.')
  return found[0].masks


def as_masked(params: Any, masks: Any) -> Any:
  """params with each kernel that has a mask as `core.Masked(value zeroed off the mask, mask)`.

  masks: a tree like params (or like its trainable part) with bool arrays at the pruned kernels and None
  elsewhere, as `gradual_magnitude`'s state and `sparse_masks(opt_state)` hold.
  """
  return jax.tree.map(lambda m, w: w if m is None else core.Masked(jnp.where(m, w, jnp.zeros((), w.dtype)), m),
                      masks, params, is_leaf=lambda x: x is None)


# The methods: pruning while fine-tuning --------------------------------------------------------------------------

def check_steps(cfg) -> None:
  """Schedule steps fall inside the run: 0 <= begin_step <= end_step <= steps, update_every >= 1, and the KD
  weight kd_weight in [0, 1] (a method config's fields)."""
  begin = getattr(cfg, 'begin_step', 0)
  end = cfg.end_step if cfg.end_step is not None else cfg.steps
  if not 0 <= begin <= end:
    raise ValueError(f'begin_step={begin} must lie in [0, end_step={end}].')
  if cfg.end_step is not None and not 1 <= cfg.end_step <= cfg.steps:
    raise ValueError(f'end_step={cfg.end_step} must lie in [1, steps={cfg.steps}] (the schedule ends inside the '
                     'run); None picks a default.')
  if cfg.update_every is not None and cfg.update_every < 1:
    raise ValueError(f'update_every={cfg.update_every} must be >= 1 (None: a tenth of the steps).')
  if not 0.0 <= cfg.kd_weight <= 1.0:
    raise ValueError(f'kd_weight={cfg.kd_weight} must lie in [0, 1] (0: task loss only, 1: KD only).')


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualPruneConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # sparsity of every block kernel once the schedule ends
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  begin_step: int = 0  # first pruning step
  end_step: int | None = None  # step where the schedule reaches `sparsity` (None: 70% of steps)
  update_every: int | None = None  # steps between mask updates (None: a tenth of the steps)
  kd_weight: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)
  rules: core.Rules = core.Rules()  # which weights are pruned (recipe: include=, exclude=, embeddings=, head=)

  def __post_init__(self):
    check_steps(self)


def gradual(model: Model, params: Params, calib, *, config: GradualPruneConfig = GradualPruneConfig()
            ) -> tuple[Model, Params]:
  """Gradual magnitude pruning to Zhu & Gupta's cubic schedule while fine-tuning on calib.train (the task loss,
  or KD from calib.reference_model mixed in with weight kd_weight); block kernels come back `core.Masked`.

  calib: a `registry.Context` with training batches (`train`), and the uncompressed model when kd_weight > 0.
  """
  ctx = registry.as_context(calib)
  cfg = config
  end = cfg.end_step if cfg.end_step is not None else max(cfg.begin_step, 1, round(0.7 * cfg.steps))
  gcfg = GradualConfig(final_sparsity=cfg.sparsity, begin_step=cfg.begin_step, end_step=end,
                       frequency=cfg.update_every or max(1, cfg.steps // 10),
                       rules=model.selection_rules(cfg.rules))
  out = recovery.fit(ctx, 'gradual', model, params, recovery.mixed_objective(model, ctx, cfg.kd_weight),
                     steps=cfg.steps, learning_rate=cfg.learning_rate, transforms=gradual_magnitude(gcfg),
                     finish=lambda s: as_masked(s.params, s.transform_state))
  return model, out


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicSparseConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # constant sparsity of every block kernel from step 0
  init: str = 'magnitude'  # step-0 mask: 'magnitude' (largest |W|, for the pretrained models stages take) | 'random'
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  update_every: int | None = None  # steps between drop-and-regrow updates (None: a tenth of the steps)
  end_step: int | None = None  # last mask update (None: 75% of steps, as RigL)
  drop_fraction: float = 0.3  # fraction of kept weights replaced at the first update (cosine decay)
  kd_weight: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)
  rules: core.Rules = core.Rules()  # which weights are pruned (recipe: include=, exclude=, embeddings=, head=)

  def __post_init__(self):
    check_steps(self)
    if not 0.0 < self.drop_fraction < 1.0:
      raise ValueError(f'drop_fraction={self.drop_fraction} must lie in (0, 1).')
    if self.init not in ('magnitude', 'random'):
      raise ValueError(f"init={self.init!r} must be 'magnitude' (pretrained weights) or 'random' (from scratch).")


def _dynamic_sparse(method: str, model: Model, params: Params, calib, config: DynamicSparseConfig,
                    key: jax.Array | None) -> tuple[Model, Params]:
  """SET or RigL (`method`) at constant sparsity while fine-tuning on calib.train; `core.Masked` block kernels."""
  ctx = registry.as_context(calib)
  cfg = config
  key = ctx.key(method) if key is None else key
  end = cfg.end_step if cfg.end_step is not None else max(1, round(0.75 * cfg.steps))
  scfg = SparseTrainingConfig(method=method, sparsity=cfg.sparsity, init=cfg.init, end_step=end,
                              update_every=cfg.update_every or max(1, cfg.steps // 10),
                              drop_fraction=cfg.drop_fraction, seed=int(jax.random.randint(key, (), 0, 2 ** 31 - 1)),
                              rules=model.selection_rules(cfg.rules))
  out = recovery.fit(ctx, method, model, params, recovery.mixed_objective(model, ctx, cfg.kd_weight), steps=cfg.steps,
                     learning_rate=cfg.learning_rate, wrap=lambda tx: sparse_optimizer(tx, scfg),
                     finish=lambda s: as_masked(s.params, sparse_masks(s.opt_state)))
  return model, out


def set(model: Model, params: Params, calib, *, config: DynamicSparseConfig = DynamicSparseConfig(),  # noqa: A001
        key: jax.Array | None = None) -> tuple[Model, Params]:
  """SET: drop the smallest |W|, regrow at random, at constant sparsity while fine-tuning on calib.train.
  key: where weights regrow (and random initial masks); None: the context's key of 'set'."""
  return _dynamic_sparse('set', model, params, calib, config, key)


def rigl(model: Model, params: Params, calib, *, config: DynamicSparseConfig = DynamicSparseConfig(),
         key: jax.Array | None = None) -> tuple[Model, Params]:
  """RigL: drop the smallest |W|, regrow by the largest |∂L/∂W|, at constant sparsity while fine-tuning on
  calib.train. key: random initial masks (init='random'); None: the context's key of 'rigl'."""
  return _dynamic_sparse('rigl', model, params, calib, config, key)


registry.register('gradual', GradualPruneConfig, gradual, family='pruning', forbids=registry.COMPRESSED,
                  adds='masked', trains=True, paper='Zhu & Gupta, "To prune, or not to prune: exploring the efficacy '
                  'of pruning for model compression" (2017): magnitude pruning to a cubic schedule during training')
registry.register('set', DynamicSparseConfig, set, family='pruning', forbids=registry.COMPRESSED, adds='masked',
                  trains=True, paper='Mocanu et al., "Scalable training of artificial neural networks with adaptive '
                  'sparse connectivity inspired by network science" (Nature Communications 2018): SET')
registry.register('rigl', DynamicSparseConfig, rigl, family='pruning', forbids=registry.COMPRESSED, adds='masked',
                  trains=True, paper='Evci et al., "Rigging the Lottery: Making All Tickets Winners" (ICML 2020): RigL')
