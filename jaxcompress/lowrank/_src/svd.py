"""Truncated SVD into `core.LowRank` leaves, plain or weighted by calibration statistics.

Every method here solves the same problem with a different left weighting S [in, in] of the kernel W [in, out]
(our layout: y = x W):

    min over rank-r Ŵ of ‖S (W − Ŵ)‖_F   =>   S W = U Σ Vᵀ,   Ŵ = S⁻¹ U_r Σ_r V_rᵀ,

whose minimum is sqrt(Σ_{i>r} σ_i²) (Eckart–Young on S W). The factors are balanced: a = U_r Σ_r^½ [in, r],
b = Σ_r^½ V_rᵀ [r, out] for S = I, and the same product rebalanced (`balance`) otherwise, so recovery training
starts from equally scaled factors.

- plain SVD: S = I.
- FWSVD (Hsu et al., "Language model compression with weighted low-rank factorization", ICLR 2022):
  S = diag(√I), I_j = Σ_k Σ_batches (∂L/∂W_jk)² the Fisher importance of input row j (`fisher_rows`).
- ASVD (Yuan et al., "ASVD: Activation-aware singular value decomposition", 2023): S = diag(mean_t |x_tj|^α),
  from the calibration `abs_mean()` observer.
- SVD-LLM (Wang et al., "SVD-LLM: truncation-aware SVD for LLM compression", 2024): S = Lᵀ with XᵀX = L Lᵀ
  (Cholesky, from the calibration `hessian()` observer), so ‖X (W − Ŵ)‖_F = ‖Lᵀ (W − Ŵ)‖_F and the truncation
  loss of each discarded singular value is exactly that value. A singular XᵀX (dead inputs, fewer tokens than
  inputs) is damped: XᵀX + λ·mean(diag XᵀX)·I with λ = `damp` (the loss identity then holds for the damped
  matrix).

Ranks are chosen by `RankRule`: a fixed rank, an energy threshold, a uniform parameter fraction per kernel, or
one parameter budget over all selected kernels allocated greedily by the σ² a rank buys per parameter (a kernel
whose rank would reach its break-even point, d/2 for a square d×d one, stays dense instead).
"""

from __future__ import annotations

import dataclasses
import heapq
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import calibration, core, registry
from jaxcompress.eval import lm

METHODS = ('svd', 'fwsvd', 'asvd', 'svd_llm')
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankRule:
  """How many singular values each selected kernel keeps; exactly one field is set."""

  rank: int | None = None  # the same rank for every kernel
  energy: float | None = None  # smallest rank whose Σσ² reaches this fraction (0, 1] of the (weighted) total
  keep: float | None = None  # each kernel keeps this fraction (0, 1) of its dense parameter count
  budget: float | None = None  # all kernels together keep this fraction (0, 1); ranks allocated greedily

  def __post_init__(self):
    given = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
    if len(given) != 1:
      raise ValueError(f'RankRule: set exactly one of rank, energy, keep, budget; got {given or "none"}.')
    if self.rank is not None and self.rank < 1:
      raise ValueError(f'RankRule: rank={self.rank} must be >= 1.')
    if self.energy is not None and not 0 < self.energy <= 1:
      raise ValueError(f'RankRule: energy={self.energy} must be in (0, 1].')
    for name in ('keep', 'budget'):
      v = getattr(self, name)
      if v is not None and not 0 < v < 1:
        raise ValueError(f'RankRule: {name}={v} must be in (0, 1), the fraction of parameters kept.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDConfig:
  """A low-rank factorization method and its rank rule."""

  method: str = 'svd'  # one of METHODS
  ranks: RankRule = RankRule(keep=0.5)  # how many singular values each kernel keeps
  activation_power: float = 0.5  # ASVD's exponent α of the mean activation magnitude
  damp: float = 1e-4  # SVD-LLM's damping of XᵀX, relative to its mean diagonal (0: none)
  rules: core.Rules = core.Rules()  # which kernels are factorized (default: the blocks' kernels)

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'SVDConfig: method={self.method!r}; choose one of {METHODS}.')


def check_rank(rank: int, shape: tuple[int, ...], path: str = 'kernel') -> None:
  d_in, d_out = shape
  if not 1 <= rank <= min(d_in, d_out):
    raise ValueError(f"rank={rank} for '{path}' of shape {tuple(shape)} must be in [1, {min(d_in, d_out)}] "
                     '(at least 1, at most min(in, out)).')


# Weightings S: a vector [in] means diag(s); a matrix [in, in] is upper triangular (Lᵀ).

def fisher_scale(fisher: jax.Array) -> jax.Array:
  """FWSVD: √I [in] from the summed squared gradients of each input row; zero rows get the smallest
  positive weight so S stays invertible."""
  return _positive(jnp.sqrt(jnp.asarray(fisher, jnp.float32)))


def activation_scale(abs_mean_stats: Mapping[str, jax.Array], alpha: float = 0.5) -> jax.Array:
  """ASVD: (mean_t |x_j|)^α [in] from `calibration.abs_mean()` statistics."""
  mean = abs_mean_stats['abs_sum'] / jnp.maximum(abs_mean_stats['count'], 1).astype(jnp.float32)
  return _positive(mean ** alpha)


def whitening(hessian_stats: Mapping[str, jax.Array], damp: float = 1e-4) -> jax.Array:
  """SVD-LLM: Lᵀ [in, in] (upper triangular) with L Lᵀ = XᵀX + damp·mean(diag)·I, from `calibration.hessian()`.

  Raises if the matrix is not positive definite even after damping (raise `damp`)."""
  xtx = jnp.asarray(hessian_stats['xtx'], jnp.float32)
  xtx = xtx + damp * jnp.mean(jnp.diag(xtx)) * jnp.eye(xtx.shape[0], dtype=xtx.dtype)
  chol = jnp.linalg.cholesky(xtx)
  if not bool(jnp.all(jnp.isfinite(chol))):
    raise ValueError(f'whitening: XᵀX is singular or not positive definite with damp={damp}; raise damp '
                     '(e.g. 1e-2) or calibrate on more tokens than inputs.')
  return chol.T


def _positive(s: jax.Array) -> jax.Array:
  floor = jnp.maximum(jnp.max(s) * 1e-6, jnp.finfo(jnp.float32).tiny)
  return jnp.maximum(s, floor)


def _scaled(w: jax.Array, s: jax.Array | None) -> jax.Array:
  if s is None:
    return w
  return s[:, None] * w if s.ndim == 1 else jnp.matmul(s, w, precision=_HI)


def _unscale(u: jax.Array, s: jax.Array | None) -> jax.Array:
  if s is None:
    return u
  if s.ndim == 1:
    return u / s[:, None]
  return jax.scipy.linalg.solve_triangular(s, u, lower=False)


def spectrum(w: Any, s: jax.Array | None = None) -> jax.Array:
  """Singular values [min(in, out)] of S·W, descending (float32)."""
  return jnp.linalg.svd(_scaled(jnp.asarray(core.materialize(w), jnp.float32), s), compute_uv=False)


def factorize(w: Any, rank: int, s: jax.Array | None = None) -> core.LowRank:
  """W [in, out] -> LowRank(a [in, rank], b [rank, out]) minimizing ‖S (W − a b)‖_F (S = I when s is None)."""
  w = jnp.asarray(core.materialize(w), jnp.float32)
  check_rank(rank, w.shape)
  u, sigma, vt = jnp.linalg.svd(_scaled(w, s), full_matrices=False)
  if s is None:
    root = jnp.sqrt(sigma[:rank])
    return core.LowRank(a=u[:, :rank] * root[None, :], b=root[:, None] * vt[:rank])
  return balance(_unscale(u[:, :rank] * sigma[None, :rank], s), vt[:rank])


def balance(a: jax.Array, b: jax.Array) -> core.LowRank:
  """The same product a·b as LowRank(U Σ^½, Σ^½ Vᵀ) from its thin SVD (via QR of both factors).

  Unweighting by S⁻¹ leaves a with very large rows where S is small; balanced factors keep gradient steps of
  recovery training on the same scale for a and b."""
  qa, ra = jnp.linalg.qr(a)
  qb, rb = jnp.linalg.qr(b.T)
  u, sigma, vt = jnp.linalg.svd(jnp.matmul(ra, rb.T, precision=_HI))
  root = jnp.sqrt(sigma)
  return core.LowRank(a=jnp.matmul(qa, u * root[None, :], precision=_HI),
                      b=jnp.matmul(root[:, None] * vt, qb.T, precision=_HI))


def truncation_loss(w: Any, rank: int, s: jax.Array | None = None) -> jax.Array:
  """sqrt(Σ_{i>rank} σ_i²) of S·W: the weighted error ‖S (W − Ŵ)‖_F of the rank-`rank` factorization."""
  sigma = spectrum(w, s)
  return jnp.sqrt(jnp.sum(jnp.square(sigma[rank:])))


def keep_rank(shape: tuple[int, int], keep: float) -> int:
  """The rank whose factors hold `keep` of a dense [in, out] kernel's parameters (at least 1)."""
  d_in, d_out = shape
  return max(1, min(min(d_in, d_out), int(keep * d_in * d_out / (d_in + d_out))))


def energy_rank(sigma: np.ndarray, energy: float) -> int:
  """Smallest r with Σ_{i<r} σ_i² >= energy · Σ σ_i²."""
  e = np.cumsum(np.square(np.asarray(sigma, np.float64)))
  return int(min(len(e), np.searchsorted(e, energy * e[-1] * (1 - 1e-12)) + 1))


def break_even_rank(shape: tuple[int, int]) -> int:
  """The largest rank whose factors [in, r] + [r, out] hold fewer parameters than the dense [in, out] kernel.

  A square d×d kernel saves parameters only below d/2: rank d/2 already stores as many as the dense kernel."""
  d_in, d_out = shape
  return max(0, min(min(d_in, d_out), (d_in * d_out - 1) // (d_in + d_out)))


def budget_ranks(spectra: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]],
                 budget: float) -> dict[str, int | None]:
  """Ranks keeping `budget` of the kernels' total dense parameters, allocated across kernels greedily.

  Every kernel starts at rank 1; then the step with the largest σ² bought per parameter is taken while it fits:
  the next singular value (costs in + out), or, for a kernel already at its `break_even_rank`, staying dense
  (costs the rest of in·out, buys every discarded σ²). A kernel that stays dense gets rank None. This spends a
  20% reduction where it is cheapest instead of cutting every kernel by 20%, and never stores factors larger
  than the dense kernel.
  """
  total = sum(i * o for i, o in shapes.values())
  floor = sum(i + o for i, o in shapes.values())
  left = budget * total - floor
  if left < 0:
    raise ValueError(f'budget={budget} keeps {budget * total:.0f} parameters, less than rank 1 everywhere '
                     f'({floor}); raise the budget.')
  ranks: dict[str, int | None] = {p: 1 for p in shapes}
  tails = {p: np.cumsum(np.square(np.asarray(spectra[p], np.float64))[::-1])[::-1] for p in shapes}

  def next_step(p):
    """(−gain per parameter, p, cost) of p's next step, or None when p is dense."""
    r, (d_in, d_out) = ranks[p], shapes[p]
    if r is None:
      return None
    if r < break_even_rank(shapes[p]):
      return (-float(spectra[p][r]) ** 2 / (d_in + d_out), p, d_in + d_out)
    cost = d_in * d_out - r * (d_in + d_out)
    tail = float(tails[p][r]) if r < len(tails[p]) else 0.0
    return (-tail / max(cost, 1), p, cost)

  heap = [s for s in map(next_step, shapes) if s is not None]
  heapq.heapify(heap)
  while heap:
    _, p, cost = heapq.heappop(heap)
    if cost > left:
      continue  # this kernel's next step does not fit; cheaper ones still may
    left -= cost
    ranks[p] = None if ranks[p] >= break_even_rank(shapes[p]) else ranks[p] + 1
    step = next_step(p)
    if step is not None:
      heapq.heappush(heap, step)
  return ranks


def choose_ranks(rule: RankRule, spectra: Mapping[str, np.ndarray],
                 shapes: Mapping[str, tuple[int, int]]) -> dict[str, int | None]:
  """{path: rank} for every kernel, by the rule (spectra: singular values of S·W, descending); None: the
  kernel stays dense (budget rule only)."""
  if rule.rank is not None:
    for p, sh in shapes.items():
      check_rank(rule.rank, sh, p)
    return {p: rule.rank for p in shapes}
  if rule.energy is not None:
    return {p: energy_rank(spectra[p], rule.energy) for p in shapes}
  if rule.keep is not None:
    return {p: keep_rank(sh, rule.keep) for p, sh in shapes.items()}
  return budget_ranks(spectra, shapes, rule.budget)


def scales(config: SVDConfig, stats: Mapping[str, Any] | None, paths: Iterable[str]) -> dict[str, Any]:
  """{path: S} for the config's method. stats[path]: fwsvd -> Fisher rows [in] (`fisher_rows`);
  asvd -> `abs_mean()` statistics; svd_llm -> `hessian()` statistics."""
  paths = list(paths)
  if config.method == 'svd':
    return {p: None for p in paths}
  if stats is None:
    raise ValueError(f'method={config.method!r} needs calibration statistics; pass stats= (see SVDConfig).')
  missing = [p for p in paths if p not in stats]
  if missing:
    raise KeyError(f'method={config.method!r}: no statistics for {missing[:3]}; calibrate the same selection.')
  if config.method == 'fwsvd':
    return {p: fisher_scale(stats[p]) for p in paths}
  if config.method == 'asvd':
    return {p: activation_scale(_pick(stats[p], 'abs_sum'), config.activation_power) for p in paths}
  return {p: whitening(_pick(stats[p], 'xtx'), config.damp) for p in paths}


def _pick(stats: Any, key: str) -> Any:
  """The observer's stats holding `key`, also inside `calibration.combine(...)` results."""
  if key in stats:
    return stats
  for v in stats.values():
    if isinstance(v, Mapping) and key in v:
      return v
  raise KeyError(f"statistics hold no '{key}' (keys {sorted(stats)}); use the matching calibration observer.")


def compress(params: Any, *, config: SVDConfig = SVDConfig(), stats: Mapping[str, Any] | None = None) -> Any:
  """params with every selected kernel replaced by a `LowRank` leaf, ranks by `config.ranks`.

  stats: per-kernel-path statistics for the weighted methods (see `scales`).
  """
  sel = core.select_by(params, config.rules)
  if not len(sel):
    raise ValueError(f'compress: the rules {config.rules} select no kernel; check the include/exclude regexes.')
  weights = sel.get(core.resolve(params))
  shapes = {p: tuple(core.shape_of(w)) for p, w in weights.items()}
  s = scales(config, stats, sel.paths)
  need_spectra = config.ranks.energy is not None or config.ranks.budget is not None
  spectra = {p: np.asarray(spectrum(weights[p], s[p])) for p in sel.paths} if need_spectra else {}
  ranks = choose_ranks(config.ranks, spectra, shapes)
  return sel.map(lambda p, w: w if ranks[p] is None else factorize(w, ranks[p], s[p]), params)


CALIBRATED = ('asvd', 'svd_llm')  # the methods whose weighting comes from calibration statistics


def compress_model(model: Any, params: Any, batches: Iterable[Any], *, config: SVDConfig,
                   mesh: Any = None) -> Any:
  """ASVD or SVD-LLM of a model: `compress` with the statistics of the model as given (`abs_mean()` for
  ASVD, `hessian()` for SVD-LLM) on the calibration batches.

  With a per-kernel rank rule (rank, energy, keep) each kernel needs only its own statistics, so the kernels
  are factorized block by block (`calibration.run_sequential` with calibrate_on='original': one block's
  statistics at a time, the same as `calibrate`'s, and it runs out of core). A `budget` allocates ranks over
  every kernel's spectrum at once, and rules that select kernels outside the blocks (e.g. head=True) need the
  head's statistics: both calibrate the whole model first (`calibration.calibrate`), which out of core refuses.
  model, params, batches, mesh: as in `calibration.calibrate`. Returns the new params.
  """
  if config.method not in CALIBRATED:
    raise ValueError(f'compress_model: method={config.method!r} is not calibrated; choose one of {CALIBRATED}, '
                     'or call compress(params, config=...) (with stats= for fwsvd).')
  observer = calibration.abs_mean() if config.method == 'asvd' else calibration.hessian()
  sel = core.select_by(params, config.rules)
  if not len(sel):
    raise ValueError(f'compress_model: the rules {config.rules} select no kernel; check the include/exclude '
                     'regexes.')
  if config.ranks.rank is not None:  # before any calibration, with the full paths
    for p, shape in zip(sel.paths, sel.shapes):
      check_rank(config.ranks.rank, shape, p)
  prefix = f'{model.block_path}/'
  if config.ranks.budget is not None or any(not p.startswith(prefix) for p in sel.paths):
    stats = calibration.calibrate(model, params, batches, observer, mesh=mesh,
                                  head=any(not p.startswith(prefix) for p in sel.paths))
    if mesh is not None:  # replicated over the mesh's processes -> this process's copy, as params are
      stats = jax.tree.map(np.asarray, stats)
    return compress(params, config=config, stats=stats)

  def compress_block(i, block, stats):
    mine = [p[len(f'{prefix}{i}/'):] for p in sel.paths if p.startswith(f'{prefix}{i}/')]
    if not mine:
      return block
    # exactly the kernels selected above (head and embedding patterns were applied to the full paths)
    rules = core.Rules(include=tuple(f'^{re.escape(k)}$' for k in mine), heads=(),
                       embeddings=config.rules.embeddings)
    return compress(block, config=dataclasses.replace(config, rules=rules), stats=stats)

  params, _ = calibration.run_sequential(model, params, batches, observer, compress_block,
                                         calibrate_on='original', keep_stats=False, mesh=mesh)
  return params


def ranks_of(params: Any) -> dict[str, int]:
  """{path: rank} of every LowRank leaf."""
  return {p: w.rank for p, w in core.flatten(params).items() if isinstance(w, core.LowRank)}


def fisher_rows(model: Any, params: Any, batches: Iterable[Mapping[str, Any]], *,
                rules: core.Rules = core.Rules(),
                loss: Callable[[Any, Mapping[str, jax.Array]], jax.Array] | None = None) -> dict[str, jax.Array]:
  """FWSVD's row importances: {kernel path: Σ_batches Σ_out (∂L/∂W)² [in] float32}.

  loss(params, batch) -> scalar: one batch's loss (the gradient of one batch is one sample of the empirical
  Fisher). Default: the causal-LM mean next-token cross-entropy over batches {'inputs': [B, T] int32,
  'targets': [B, T] int32, optional 'mask'}. Models without a language-model loss pass their own, e.g.
  `output_fisher_loss` for an embedding model.
  """
  sel = core.select_by(params, rules)

  def lm_loss(p, batch):
    logits = model.apply(p, batch['inputs'])
    mask = batch.get('mask', jnp.ones(batch['targets'].shape, jnp.float32))
    return jnp.sum(lm.token_nll(logits, batch['targets']) * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  loss = loss or lm_loss

  @jax.jit
  def sq_grad(p, batch):
    g = core.flatten(jax.grad(loss)(p, batch))
    return {q: jnp.sum(jnp.square(g[q]), axis=1) for q in sel.paths}

  total = None
  dense = core.materialize_tree(core.resolve(params))
  for batch in batches:
    got = sq_grad(dense, {k: jnp.asarray(v) for k, v in batch.items()})
    total = got if total is None else jax.tree.map(jnp.add, total, got)
  if total is None:
    raise ValueError('fisher_rows: batches is empty; give at least one calibration batch.')
  return total


def output_fisher_loss(forward: Callable[[Any, Mapping[str, jax.Array]], jax.Array]):
  """A `fisher_rows` loss for a model without labels (e.g. sentence embeddings): εᵀ f(x) with ε ~ N(0, I).

  For the output model y ~ N(f(x), I) the score at a label drawn from the model is (y − f)ᵀ J = εᵀ J, so
  E[(∂/∂W εᵀ f)²] is the diagonal of the true Fisher Jᵀ J. forward(params, batch) -> [B, D] outputs; batch
  must hold 'noise' [B, D] float32 drawn from N(0, 1) (a fresh draw per batch, from one seed).
  """
  return lambda p, batch: jnp.sum(forward(p, batch) * batch['noise'])


# The methods: one low-rank config for the four weightings ----------------------------------------------------------

@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankConfig:
  """The rank rule (rank, energy or budget when set, else keep) and the weightings' settings."""

  keep: float | None = registry.field(0.5, range='(0.0, 1.0)')  # each kernel keeps this fraction of its parameters
  rank: int | None = registry.field(None, range='[1, inf)')  # one rank for every kernel
  energy: float | None = registry.field(None, range='(0.0, 1.0]')  # smallest rank reaching this (weighted) energy
  budget: float | None = registry.field(None, range='(0.0, 1.0)')  # all kernels together keep this fraction
  activation_power: float = 0.5  # ASVD's exponent α of the mean activation magnitude
  damp: float = 1e-4  # SVD-LLM's damping of XᵀX
  rules: core.Rules = core.Rules()  # which kernels are factorized (recipe: include=, exclude=, embeddings=, head=)


def _factorized(method: str, model: Any, params: Any, calib: Any, config: LowRankConfig) -> tuple[Any, Any]:
  """(model, params) with the kernels `config.rules` choose (default: the blocks') as `LowRank` leaves, weighted by `method` (one of METHODS)."""
  ctx = registry.as_context(calib)
  chosen = {k: getattr(config, k) for k in ('rank', 'energy', 'budget') if getattr(config, k) is not None}
  rule = RankRule(**(chosen or {'keep': config.keep}))
  svd_cfg = SVDConfig(method=method, ranks=rule, activation_power=config.activation_power, damp=config.damp,
                      rules=model.selection_rules(config.rules))
  if method in CALIBRATED:  # block by block unless the rule needs every kernel's statistics
    return model, registry.local(compress_model(model, params, ctx.batches(split=True), config=svd_cfg,
                                                **ctx.driver_kwargs()))
  stats = None
  if method == 'fwsvd':
    if ctx.train is None:
      raise ValueError('fwsvd needs training batches with targets for its Fisher rows (calib=Context(train=...)).')
    stats = fisher_rows(model, params, [ctx.train.batch(i) for i in range(len(ctx.calib) or 1)],
                        rules=model.selection_rules(config.rules))
  return model, compress(params, config=svd_cfg, stats=stats)


def svd(model: Any, params: Any, calib: Any = None, *, config: LowRankConfig = LowRankConfig()) -> tuple[Any, Any]:
  """Truncated SVD of every block kernel W [in, out] -> LowRank(a [in, r], b [r, out]); no data needed."""
  return _factorized('svd', model, params, calib, config)


def fwsvd(model: Any, params: Any, calib: Any, *, config: LowRankConfig = LowRankConfig()) -> tuple[Any, Any]:
  """Fisher-weighted SVD: input rows weighted by √ of their summed squared gradients on the training batches
  (calib.train; as many batches as calibration batches, at least one)."""
  return _factorized('fwsvd', model, params, calib, config)


def asvd(model: Any, params: Any, calib: Any, *, config: LowRankConfig = LowRankConfig()) -> tuple[Any, Any]:
  """Activation-aware SVD: input rows weighted by (mean |x|)^activation_power on the calibration batches."""
  return _factorized('asvd', model, params, calib, config)


def svd_llm(model: Any, params: Any, calib: Any, *, config: LowRankConfig = LowRankConfig()) -> tuple[Any, Any]:
  """SVD-LLM: the kernel whitened by the Cholesky factor of the calibration inputs' XᵀX (damped by damp)."""
  return _factorized('svd_llm', model, params, calib, config)


registry.register('svd', LowRankConfig, svd, family='lowrank', forbids=registry.COMPRESSED, adds='lowrank',
                  paper='truncated SVD (Eckart-Young); Denton et al. (NeurIPS 2014)')
registry.register('fwsvd', LowRankConfig, fwsvd, family='lowrank', forbids=registry.COMPRESSED, adds='lowrank',
                  trains=False, paper='Hsu et al., "Language Model Compression with Weighted Low-rank '
                  'Factorization" (ICLR 2022)')
registry.register('asvd', LowRankConfig, asvd, family='lowrank', forbids=registry.COMPRESSED, adds='lowrank',
                  calibrated=True, paper='Yuan et al., "ASVD: Activation-aware Singular Value Decomposition" (2023)')
registry.register('svd_llm', LowRankConfig, svd_llm, family='lowrank', forbids=registry.COMPRESSED, adds='lowrank',
                  calibrated=True, paper='Wang et al., "SVD-LLM: Truncation-aware Singular Value Decomposition" '
                  '(2024)')
