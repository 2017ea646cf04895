"""Movement pruning: learned importance scores, kept whole weights, a straight-through mask.

Sanh, Wolf, Rush, "Movement Pruning: Adaptive Sparsity by Fine-Tuning" (NeurIPS 2020), Sec. 3-4. Each selected
weight W gets a trainable score S; the layer computes with W' = W ⊙ M, and the scores are trained by a
straight-through estimator of the mask's gradient:

    ∂L/∂S = ∂L/∂W' · W          ∂L/∂W = ∂L/∂W' · M

Two ways of turning S into M:

  hard movement   M = Top_v(S): the (1 - v) · N largest scores of each kernel, v following Zhu & Gupta's cubic
                  schedule to the target sparsity (`HardMovementConfig`); no penalty. The weights stay whole, so
                  a pruned weight keeps a score gradient ∂L/∂W' · W and returns once its score climbs back into
                  the top; the scores accumulate -Σ_t ∂L/∂W' · W under plain SGD, the paper's movement.
  soft movement   M = 1(S > τ) for a fixed, global threshold τ (`SoftMovementConfig`), loss = L + λ · R(S) with
                  R(S) = mean σ(S): the paper's L1 penalty Σ σ(S) divided by the number N of scored weights (as
                  the authors' code does), so λ does not depend on the model's size. No sparsity is asked for:
                  λ pushes every score down, a weight survives while its movement (-∂L/∂W' · W) outweighs
                  λ σ'(S) / N, and the sparsity reached is measured, not hit (larger λ: sparser). The common
                  variant with a cubic schedule of the threshold on σ(S) is not what this implements.

Why a leaf and an optax wrapper, not a Transform: the scores need the loss's gradient, which a Transform never
sees, and the weights must stay dense (a pruned weight may come back while its score rises again), which rules
out zeroing them. So the scores live in the params, in a `Scored` leaf whose `materialize()` is W ⊙ M with the
straight-through gradient above; `train.loop.fit` trains them like any other floating array, and
`soft_movement_optimizer(tx, config)` / `hard_movement_optimizer(tx, config)` give them their own Adam (their
scale has nothing to do with the weights'), soft movement's penalty gradient λ σ(S)(1 - σ(S)) / N added first
(the loss `fit` logs is L without λ R). Hard movement's kept count is an int32 array of the leaf (`keep`, never
trained); the Transform `topk_schedule(config)` sets it from the cubic schedule after each step.
`to_masked(params)` turns the trained leaves into `core.Masked` at the end.

    params = movement.with_scores(params, SoftMovementConfig(penalty=10.0))
    result = loop.fit(cfg, ..., params=params, optimizer=movement.soft_movement_optimizer(tx, config))

    config = HardMovementConfig(sparsity=0.7, end_step=700)
    params = movement.with_scores(params, config)
    result = loop.fit(cfg, ..., params=params, optimizer=movement.hard_movement_optimizer(tx, config),
                      transforms=movement.topk_schedule(config))
    pruned = movement.to_masked(result.state.params)       # core.Masked leaves

The methods `movement` and `soft_movement` do this while fine-tuning on calib.train (`train.recovery.fit`):

    model, params = pruning.movement(model, params, ctx, config=pruning.MovementPruneConfig(sparsity=0.7))
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxcompress import core, registry
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src.gradual import check_steps, cubic_sparsity
from jaxcompress.pruning._src import masks as masks_lib
from jaxcompress.train import recovery, transforms


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Scored(core.Compressed):
  """A weight being pruned by its learned scores: `value` where the mask is on, zero elsewhere.

  value:     [*shape] float, the dense weight W (kept whole during training).
  scores:    [*shape] float32, the importance scores S.
  threshold: static τ: soft movement's mask is S > τ.
  keep:      None (soft movement), or an int32 scalar k: hard movement's mask is the k largest scores (ties go
             to the lower flat index).

  A training-time form (`to_masked` ends it): `materialize()` is W ⊙ M whose gradient is ∂L/∂W' · M for W and
  ∂L/∂W' · W for S (straight through the step function).
  """

  value: Any
  scores: Any
  threshold: float = leaf_lib.static(default=0.0)
  keep: Any = None

  @property
  def shape(self):
    return leaf_lib.shape_of(self.value)

  @property
  def dtype(self):
    return leaf_lib.dtype_of(self.value)

  def mask(self) -> jax.Array:
    """bool [*shape]: the weights kept now."""
    if self.keep is None:
      return self.scores > self.threshold
    flat = self.scores.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    on = jnp.arange(flat.size) < self.keep
    return jnp.zeros(flat.shape, bool).at[order].set(on).reshape(self.scores.shape)

  def materialize(self):
    hard = self.mask().astype(self.value.dtype)
    # Value M, derivative 1 with respect to S: d(W ⊙ ste)/dS = W, d/dW = M.
    ste = hard + (self.scores - lax.stop_gradient(self.scores)).astype(self.value.dtype)
    return self.value * ste

  def kept(self) -> int:
    return leaf_lib.count_nonzero(self.mask())

  def stored_params(self):
    return self.kept()

  def memory_bytes(self):
    return leaf_lib.memory_bytes(self.value) + leaf_lib.memory_bytes(self.scores)

  def disk_bytes(self):
    # What it is saved as: `to_masked` gives a Masked leaf (kept values and a bit per entry).
    return self.kept() * self.dtype.itemsize + -(-self.size // 8)

  def matmul_flops(self):
    return 2 * self.kept()


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class SoftMovementConfig:
  penalty: float = 10.0  # λ: weight of R(S) = mean σ(S) over the scored weights; sets the sparsity reached
  threshold: float = 0.0  # τ: a weight is kept while its score is above it
  initial_score: float = 0.1  # S at the start, the same for every weight (above τ: the run starts dense)
  score_learning_rate: float = 1e-2  # Adam step size of the scores (constant)
  rules: core.Rules = core.Rules()  # which kernels are scored and pruned (default: every kernel but the heads')


def check_config(config: SoftMovementConfig, caller: str = 'soft movement') -> None:
  c = config
  if not (np.isfinite(c.penalty) and c.penalty >= 0):
    raise ValueError(f'{caller}: penalty={c.penalty} must be a finite number >= 0 (larger: sparser).')
  if not c.initial_score > c.threshold:
    raise ValueError(f'{caller}: initial_score={c.initial_score} must be above threshold={c.threshold}, or '
                     'every weight is pruned before the first step.')
  if not (np.isfinite(c.score_learning_rate) and c.score_learning_rate > 0):
    raise ValueError(f'{caller}: score_learning_rate={c.score_learning_rate} must be a positive number.')


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class HardMovementConfig:
  sparsity: float = 0.5  # sparsity of every selected kernel from end_step on
  initial_sparsity: float = 0.0  # sparsity up to begin_step
  begin_step: int = 0  # first step the schedule moves
  end_step: int = 1000  # step where the cubic schedule reaches `sparsity`
  update_every: int = 1  # steps between changes of the kept count (1: every step, as the paper)
  initial_score: float = 0.0  # S at the start, the same for every weight (the paper's constant init)
  score_learning_rate: float = 1e-2  # Adam step size of the scores (constant)
  rules: core.Rules = core.Rules()  # which kernels are scored and pruned (default: every kernel but the heads')


def check_hard_config(config: HardMovementConfig, caller: str = 'hard movement') -> None:
  c = config
  masks_lib.check_sparsity(c.sparsity, caller=f'{caller} sparsity')
  if not 0.0 <= c.initial_sparsity <= c.sparsity:
    raise ValueError(f'{caller}: initial_sparsity={c.initial_sparsity} must lie in [0, sparsity={c.sparsity}].')
  if not (0 <= c.begin_step <= c.end_step and c.update_every >= 1):
    raise ValueError(f'{caller}: need 0 <= begin_step ({c.begin_step}) <= end_step ({c.end_step}) and '
                     f'update_every >= 1 ({c.update_every}).')
  if not (np.isfinite(c.score_learning_rate) and c.score_learning_rate > 0):
    raise ValueError(f'{caller}: score_learning_rate={c.score_learning_rate} must be a positive number.')
  if not np.isfinite(c.initial_score):
    raise ValueError(f'{caller}: initial_score={c.initial_score} must be finite.')


def _check_any(config, caller: str) -> None:
  if isinstance(config, HardMovementConfig):
    check_hard_config(config, caller)
  elif isinstance(config, SoftMovementConfig):
    check_config(config, caller)
  else:
    raise TypeError(f'{caller}: config is a {type(config).__name__}; pass a SoftMovementConfig or a '
                    'HardMovementConfig.')


def _kept_count(size: int, sparsity) -> jax.Array:
  """int32 scalar: round((1 - sparsity) · size) (sparsity may be traced)."""
  return jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * size).astype(jnp.int32)


def with_scores(params: Any, config: SoftMovementConfig | HardMovementConfig = SoftMovementConfig()) -> Any:
  """params with each selected kernel as a `Scored` leaf with every score at `initial_score`: soft movement's
  (threshold τ, keep None) or hard movement's (keep = the schedule's kept count at step 0).

  Raises ValueError if the rules select nothing or select a weight that is already compressed.
  """
  _check_any(config, 'with_scores')
  hard = isinstance(config, HardMovementConfig)
  sel = core.select_by(params, config.rules)
  if not len(sel):
    raise ValueError(f'with_scores: include={config.rules.include!r} exclude={config.rules.exclude!r} selects no '
                     'parameter; see core.select(params) for the paths.')

  def one(path, w):
    if core.is_compressed(w):
      raise ValueError(f'with_scores: {path} is a {type(w).__name__}; soft movement prunes dense kernels.')
    scores = jnp.full(jnp.shape(w), config.initial_score, jnp.float32)
    if hard:
      return Scored(value=w, scores=scores, keep=_kept_count(int(np.prod(jnp.shape(w))), config.initial_sparsity))
    return Scored(value=w, scores=scores, threshold=float(config.threshold))
  return sel.map(one, params)


def topk_schedule(config: HardMovementConfig) -> transforms.Transform:
  """A Transform setting `keep` of every hard-movement `Scored` leaf to round((1 - v_t) · N) after step t, v_t
  the cubic schedule (`gradual.cubic_sparsity`) held between updates every `update_every` steps; so the
  forward of step t + 1 uses Top_{v_t}(S). Stateless (the kept count lives in the leaves)."""
  check_hard_config(config, 'topk_schedule')
  c = config

  def update(params, state, step, rng):
    del rng
    # The schedule read at the last due step (a staircase when update_every > 1); end_step always due.
    last = c.begin_step + ((jnp.maximum(step, c.begin_step) - c.begin_step) // c.update_every) * c.update_every
    last = jnp.where(step >= c.end_step, c.end_step, last)
    v = cubic_sparsity(last, initial=c.initial_sparsity, final=c.sparsity, begin_step=c.begin_step,
                                   end_step=c.end_step)

    def one(w):
      if isinstance(w, Scored) and w.keep is not None:
        return dataclasses.replace(w, keep=_kept_count(w.size, v))
      return w
    return jax.tree.map(one, params, is_leaf=core.is_compressed), state

  return transforms.Transform(update=update)


def _is_score(path) -> bool:
  return bool(path) and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'scores'


def score_labels(params: Any) -> Any:
  """A tree like params: 'scores' at the scores of `Scored` leaves, 'weights' elsewhere (None stays None)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: 'scores' if _is_score(p) else 'weights', params)


def score_penalty(penalty: float) -> optax.GradientTransformation:
  """Adds the gradient of penalty · mean σ(S) (over every score array it is given) to the score updates."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('score_penalty: update needs params (the scores); optax.multi_transform passes them.')
    n = sum(int(np.size(g)) for g in jax.tree.leaves(updates))
    add = lambda g, s: g + (penalty / max(n, 1)) * jax.nn.sigmoid(s) * (1 - jax.nn.sigmoid(s))
    return jax.tree.map(add, updates, params), state

  return optax.GradientTransformation(init, update)


def soft_movement_optimizer(tx: optax.GradientTransformation, config: SoftMovementConfig = SoftMovementConfig()
                            ) -> optax.GradientTransformation:
  """tx for the weights; for the scores of `Scored` leaves, the penalty's gradient then Adam at
  `score_learning_rate`. Needs `params` in update (loop.fit passes them)."""
  check_config(config, 'soft_movement_optimizer')
  scores = optax.chain(score_penalty(config.penalty), optax.adam(config.score_learning_rate))
  return optax.multi_transform({'weights': tx, 'scores': scores}, score_labels)


def hard_movement_optimizer(tx: optax.GradientTransformation, config: HardMovementConfig = HardMovementConfig()
                            ) -> optax.GradientTransformation:
  """tx for the weights; Adam at `score_learning_rate` for the scores of `Scored` leaves (no penalty). Pair it
  with `topk_schedule(config)` as a transform."""
  check_hard_config(config, 'hard_movement_optimizer')
  return optax.multi_transform({'weights': tx, 'scores': optax.adam(config.score_learning_rate)}, score_labels)


def to_masked(params: Any) -> Any:
  """Every `Scored` leaf -> `core.Masked(value zeroed where pruned, its mask())`; the rest unchanged."""
  def one(w):
    if not isinstance(w, Scored):
      return w
    m = w.mask()
    return core.Masked(jnp.where(m, w.value, jnp.zeros((), w.value.dtype)), m)
  return jax.tree.map(one, params, is_leaf=core.is_compressed)


class MovementStats(NamedTuple):
  kept: int  # weights kept over the scored kernels
  total: int  # scored weights


def kept_fraction(params: Any) -> MovementStats:
  """How many scored weights are kept now (host-side)."""
  leaves = [w for w in jax.tree.leaves(params, is_leaf=core.is_compressed) if isinstance(w, Scored)]
  return MovementStats(sum(w.kept() for w in leaves), sum(w.size for w in leaves))


# The methods: movement pruning while fine-tuning -----------------------------------------------------------------

@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class MovementPruneConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # sparsity of every block kernel once the schedule ends
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate of the weights (cosine)
  score_learning_rate: float = 1e-2  # Adam step size of the scores (constant)
  begin_step: int = 0  # first step the schedule moves
  end_step: int | None = None  # step where the schedule reaches `sparsity` (None: 70% of steps)
  update_every: int | None = None  # steps between changes of the kept count (None: every step, as the paper)
  kd_weight: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)
  rules: core.Rules = core.Rules()  # which weights are pruned (recipe: include=, exclude=, embeddings=, head=)

  def __post_init__(self):
    check_steps(self)


def movement(model: Model, params: Params, calib, *, config: MovementPruneConfig = MovementPruneConfig()
             ) -> tuple[Model, Params]:
  """Hard movement pruning while fine-tuning on calib.train: W ⊙ Top_v(S), v on the cubic schedule to
  `sparsity`; block kernels come back `core.Masked`.

  calib: a `registry.Context` with training batches (`train`), and the uncompressed model when kd_weight > 0.
  """
  ctx = registry.as_context(calib)
  cfg = config
  end = cfg.end_step if cfg.end_step is not None else max(cfg.begin_step, 1, round(0.7 * cfg.steps))
  mcfg = HardMovementConfig(sparsity=cfg.sparsity, begin_step=cfg.begin_step, end_step=end,
                            update_every=cfg.update_every or 1, score_learning_rate=cfg.score_learning_rate,
                            rules=model.selection_rules(cfg.rules))
  out = recovery.fit(ctx, 'movement', model, with_scores(params, mcfg),
                     recovery.mixed_objective(model, ctx, cfg.kd_weight), steps=cfg.steps, learning_rate=cfg.learning_rate,
                     wrap=lambda tx: hard_movement_optimizer(tx, mcfg), transforms=topk_schedule(mcfg),
                     finish=lambda s: to_masked(s.params))
  return model, out


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class SoftMovementPruneConfig:
  penalty: float = 10.0  # λ on mean σ(S): sets the sparsity reached (larger: sparser); no target is hit exactly
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate of the weights (cosine)
  score_learning_rate: float = 1e-2  # Adam step size of the scores (constant)
  threshold: float = 0.0  # τ: a weight is kept while its score is above it
  initial_score: float = 0.1  # every score at the start (above τ: the run starts dense)
  kd_weight: float = 0.0  # weight of KD from the uncompressed model against the task loss (0: task loss only)
  rules: core.Rules = core.Rules()  # which weights are pruned (recipe: include=, exclude=, embeddings=, head=)

  def __post_init__(self):
    check_config(SoftMovementConfig(penalty=self.penalty, threshold=self.threshold, initial_score=self.initial_score,
                                    score_learning_rate=self.score_learning_rate))
    if not 0.0 <= self.kd_weight <= 1.0:
      raise ValueError(f'kd_weight={self.kd_weight} must lie in [0, 1] (0: task loss only, 1: KD only).')


def soft_movement(model: Model, params: Params, calib, *, config: SoftMovementPruneConfig = SoftMovementPruneConfig()
                  ) -> tuple[Model, Params]:
  """Soft movement pruning while fine-tuning on calib.train: learned scores above a fixed threshold, the sparsity
  set by the penalty λ · mean σ(S); block kernels come back `core.Masked`.

  calib: a `registry.Context` with training batches (`train`), and the uncompressed model when kd_weight > 0.
  """
  ctx = registry.as_context(calib)
  cfg = config
  mcfg = SoftMovementConfig(penalty=cfg.penalty, threshold=cfg.threshold, initial_score=cfg.initial_score,
                            score_learning_rate=cfg.score_learning_rate,
                            rules=model.selection_rules(cfg.rules))
  out = recovery.fit(ctx, 'soft_movement', model, with_scores(params, mcfg),
                     recovery.mixed_objective(model, ctx, cfg.kd_weight), steps=cfg.steps, learning_rate=cfg.learning_rate,
                     wrap=lambda tx: soft_movement_optimizer(tx, mcfg), finish=lambda s: to_masked(s.params))
  return model, out


registry.register('movement', MovementPruneConfig, movement, family='pruning', forbids=registry.COMPRESSED,
                  adds='masked', trains=True, paper='Sanh, Wolf & Rush, "Movement Pruning: Adaptive Sparsity by '
                  'Fine-Tuning" (NeurIPS 2020): hard movement, W ⊙ Top_v(S) with learned straight-through scores, '
                  'v on the cubic schedule')
registry.register('soft_movement', SoftMovementPruneConfig, soft_movement, family='pruning',
                  forbids=registry.COMPRESSED, adds='masked', trains=True, paper='Sanh, Wolf & Rush, "Movement '
                  'Pruning: Adaptive Sparsity by Fine-Tuning" (NeurIPS 2020): soft movement, learned scores above a '
                  'fixed threshold, sparsity set by λ·mean σ(S)')
