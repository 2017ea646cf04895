"""The model walk of one-shot pruning shared by Wanda and SparseGPT: each selected block kernel solved from the
statistics its inputs stream, layer by layer on the outputs of the already pruned blocks
(`calibration.run_sequential`).

The methods themselves (config, layer solver, registration) live in `wanda.py` and `sparsegpt.py`; this file
only walks the model. Mixture-of-experts weights ('mlp/up', 'mlp/gate', 'mlp/down' [E, in, out]) count as
kernels for include / exclude and are pruned expert by expert from each expert's routed tokens
(`calibration.solve_experts`, over the driver's mesh); an expert no calibration token reached is pruned by
magnitude. The router stays dense.

The per-layer distribution (`config.distribution`) is an axis of both methods:
  'uniform'  every chosen kernel at `sparsity` (the papers)
  'erk'      Erdős–Rényi-Kernel: density ∝ (in + out) / (in · out), together `sparsity` (`masks.erk_sparsities`)
  'owl'      one sparsity per block from its outlier ratio on the dense model (Yin et al. 2024, `owl.py`)
  a callable (shapes {path: shape}, sparsity) -> {path: sparsity}; or, when it takes a keyword `stats`,
             (shapes, sparsity, *, stats: DenseStatistics) -> {path: sparsity}: the dense model's kernels and
             the column norms of their inputs (every block fed by the unpruned blocks before it), from a first
             pass over the dense model before pruning starts (`calibration.DensePass`)
`overrides` replace the distribution's value last. A distribution reading statistics needs the whole dense
model before the first block is pruned. In memory that pass is one `calibration.calibrate`; the block-at-a-time
driver (`calibration.compress_checkpoint`, `compress.py --out_of_core`) streams it from the checkpoint instead,
block by block, keeping only the column norms (then reads each block's kernels once more for the distribution),
stores the resulting sparsities in its manifest (a resumed run does not repeat the pass) and prunes with them:
the same sparsities and masks as in memory, bit for bit. Out of core such a stage must be a recipe's first (its
pass reads the model as given, not as earlier stages leave it).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress import calibration, core
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src import masks as masks_lib


def selection_rules(config, model: Model | None) -> core.Rules:
  """The kernels a config's `rules` choose (model: its head patterns decide what is a head)."""
  return config.rules if model is None else model.selection_rules(config.rules)


def _experts(model: Model, params: Params, rules: core.Rules) -> set[str]:
  """Paths of the stacked expert weights of mixture-of-experts blocks (`model.routed_groups`, e.g.
  'layers/0/mlp/up' [E, d, f]) that `rules` choose: each counts as a kernel ('layers/0/mlp/up/kernel' for the
  include / exclude patterns), so the default include=KERNELS prunes them expert by expert."""
  names = {k for g in model.routed_groups for k in g.kernels}
  flat = core.paths.flatten(params)
  return {f'{model.block_path}/{i}/{k}' for i in range(model.num_layers(params)) for k in names
          if f'{model.block_path}/{i}/{k}' in flat and rules.matches(f'{model.block_path}/{i}/{k}/kernel')}


def chosen_kernels(model: Model, params: Params, config, *, blocks_only: bool = True) -> dict[str, tuple[int, ...]]:
  """{path: shape} of the kernels a pruning config's include / exclude choose (params may be abstract): the block
  kernels and stacked experts (`blocks_only`), or every kernel the rules match."""
  rules = selection_rules(config, model)
  sel = core.select_by(params, rules)
  flat = core.paths.flatten(params)
  prefix = f'{model.block_path}/'
  chosen = {p: tuple(s) for p, s in zip(sel.paths, sel.shapes) if not blocks_only or p.startswith(prefix)}
  if blocks_only:
    chosen.update({p: tuple(core.shape_of(flat[p])) for p in _experts(model, params, rules)})
  return chosen


def check_kernels(model: Model, params: Params, *, config, blocks_only: bool = True) -> None:
  """A pruning config against the model's shapes, before any weight is read: include / exclude choose some
  kernel, and an N:M pattern's M divides the input width of every chosen kernel (the registry's `check`)."""
  chosen = chosen_kernels(model, params, config, blocks_only=blocks_only)
  if not chosen:
    where = "the model's blocks" if blocks_only else 'the model'
    raise ValueError(f'include={config.rules.include!r} exclude={config.rules.exclude!r} matches no kernel of '
                     f'{where}; see model.select(params) for the paths.')
  nm = masks_lib.parse_pattern(config.pattern, caller='')
  if not isinstance(nm, tuple):
    return
  bad = {p: s[-2] for p, s in sorted(chosen.items()) if s[-2] % nm[1]}
  if bad:
    path, width = next(iter(bad.items()))
    widths = sorted({s[-2] for s in chosen.values()})
    fits = [m for m in range(nm[0] + 1, 17) if all(w % m == 0 for w in widths)]
    hint = f'an M dividing every width {widths} ({", ".join(f"{nm[0]}:{m}" for m in fits[:3])})' if fits else \
        f'an M dividing every width {widths}'
    raise ValueError(f'pattern={config.pattern!r} groups every {nm[1]} inputs, but {path} has {width} inputs '
                     f'({len(bad)} such kernels); choose {hint}, or leave those kernels out with exclude=.')


def sequential(model, params, batches, observer, solve, statistic, config, driver_kwargs):
  """params with every chosen block kernel replaced by solve(w, statistic(stats, experts), sparsity).

  observer: the calibration statistic streamed per kernel input; statistic(stats, experts) -> what `solve`
  takes (experts: the stacked [E, ...] statistics of routed experts); driver_kwargs go to
  `calibration.run_sequential` (mesh, offload, on_step, ...).
  """
  name = type(config).__name__.removesuffix('Config').lower()
  masks_lib.check_sparsity(config.sparsity, caller=name)
  masks_lib.parse_pattern(config.pattern, caller=name)
  rules = selection_rules(config, model)
  chosen = set(core.select_by(params, rules))
  prefix = f'{model.block_path}/'
  chosen = {p for p in chosen if p.startswith(prefix)} | _experts(model, params, rules)
  if not chosen:
    raise ValueError(f'{name}: include={config.rules.include!r} exclude={config.rules.exclude!r} matches no kernel '
                     f"of the model's blocks; see model.select(params) for the paths.")
  overrides: Mapping[str, float] = dict(config.overrides)
  dense = None if config.distribution == 'uniform' else dense_pass(model, params, chosen, config, caller=name)
  if config.distribution == 'uniform':
    sparsities = masks_lib.layer_sparsities({p: () for p in chosen}, config.sparsity, 'uniform', overrides)
  else:  # from the shapes alone, or (dense) from the first pass, handed to compress_block as its summary
    sparsities = {} if dense else masks_lib.apply_overrides(distribute(params, chosen, config, caller=name),
                                                            overrides)

  def compress_block(i: int, block: Params, stats: dict[str, Any], summary: Mapping[str, float] | None = None
                     ) -> Params:
    sparsities_ = sparsities if summary is None else summary  # from the dense pass: {path: sparsity}

    def one(p, w):
      full = f'{model.block_path}/{i}/{p}'
      if full not in chosen or p not in stats:
        return w
      if core.is_compressed(w):
        raise TypeError(f'{name}: {full} is already a {type(w).__name__}; prune dense kernels (materialize '
                        'first, or prune before quantizing).')
      nm = isinstance(masks_lib.parse_pattern(config.pattern), tuple)
      s = sparsities_[full]
      if s == 0 and not nm:
        return w  # an override keeping this kernel dense
      if len(core.shape_of(w)) == 3:  # stacked experts: one solve per expert, spread over the mesh
        return calibration.solve_experts(lambda we, st: solve(we, st, s), w, statistic(stats[p], True),
                                         mesh=driver_kwargs.get('mesh'))
      return solve(w, statistic(stats[p], False), s)

    return core.map_with_path(one, block)

  pruned, _ = calibration.run_sequential(model, params, batches, observer, compress_block, keep_stats=False,
                                         per_group=config.per_group, experts=True, dense=dense, **driver_kwargs)
  return pruned


# The per-layer distribution -------------------------------------------------------------------------------------

DISTRIBUTIONS = ('uniform', 'erk', 'owl')  # the names a recipe writes; from Python also a callable
# (shapes {path: shape}, sparsity) -> {path: sparsity}, or (shapes, sparsity, *, stats: DenseStatistics) -> ...
Distribution = str | Callable[..., Mapping[str, float]]


@dataclasses.dataclass(frozen=True)
class DenseStatistics:
  """What a distribution taking `stats` reads: the chosen kernels of the dense model and their inputs.

  weights: {path: kernel [in, out] ([E, in, out] for stacked experts)} as given, a mapping read on access (out of
    core: from the checkpoint, one block's kernels held at a time; read them block by block).
  sq_norms: {path: Σ_t x[t, j]² [in] ([E, in]) float32} over the calibration tokens, block i fed by the
    unpruned blocks 0..i-1 (`calibration.calibrate` with `column_norms()`, or its streamed equivalent).
  blocks: {path: index of the block holding it}.
  """

  weights: Mapping[str, Any]
  sq_norms: Mapping[str, jax.Array]
  blocks: Mapping[str, int]

  def scores(self, path: str) -> jax.Array:
    """Wanda's |W[j, o]| · ‖X_j‖₂ [in, out] ([E, in, out]) float32 of one kernel."""
    w = jnp.abs(jnp.asarray(core.materialize(self.weights[path])).astype(jnp.float32))
    return w * jnp.sqrt(jnp.maximum(jnp.asarray(self.sq_norms[path], jnp.float32), 0.0))[..., None]


def wants_statistics(distribution: Callable) -> bool:
  """Whether a distribution callable takes the dense model's statistics (a parameter named `stats`)."""
  try:
    return 'stats' in inspect.signature(distribution).parameters
  except (TypeError, ValueError):  # a builtin without a signature: the plain form
    return False


def check_distribution(config) -> None:
  """Refuses a config's distribution fields (`distribution`, `outlier_threshold`, `owl_lambda`) that cannot run,
  naming the field and the fix; called by WandaConfig and SparseGPTConfig as they are built (recipe parse time).
  Their rules choose block linears only (they are calibrated block by block): embeddings=True or head=True is
  refused too.
  """
  calibration.check_blocks_only(config.rules, type(config).__name__.removesuffix('Config').lower())
  d = config.distribution
  if not callable(d) and d not in DISTRIBUTIONS:
    raise ValueError(f'distribution={d!r} is not one of {DISTRIBUTIONS}; write one of them (from Python also a '
                     'callable (shapes, sparsity) -> {path: sparsity}). Magnitude pruning has the global '
                     'threshold: magnitude(distribution=\'global\').')
  m = config.outlier_threshold
  if isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0 or math.isinf(m):
    raise ValueError(f'outlier_threshold={m!r} must be a finite number > 0: a score is an outlier above '
                     'outlier_threshold × the block\'s mean score (OWL\'s M; the paper uses 5).')
  lam = config.owl_lambda
  if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 0.25:
    raise ValueError(f'owl_lambda={lam!r} must be in [0, 0.25]: OWL spreads the block sparsities over '
                     '[S - 2λ, S + 2λ] (the paper uses 0.08).')
  if d != 'uniform' and isinstance(config.pattern, str) and ':' in config.pattern:
    raise ValueError(f"distribution={d!r} sets each layer's sparsity, while pattern={config.pattern!r} prunes "
                     "1 - N/M of every layer; use distribution='uniform' with N:M, or an unstructured pattern.")
  s = config.sparsity
  if d == 'owl' and isinstance(s, (int, float)) and 0 < s < 1 and lam > min(s, 1 - s) / 2:
    raise ValueError(f'owl_lambda={lam!r} with sparsity={s!r} can put a block outside [0, 1) (block sparsities '
                     f'lie within sparsity ± 2·owl_lambda); give owl_lambda <= min(sparsity, 1 - sparsity) / 2 '
                     f'= {min(s, 1 - s) / 2:.4g}.')


def _resolve(config) -> Distribution:
  """config.distribution as a callable, or 'erk'."""
  if config.distribution == 'owl':
    from jaxcompress.pruning._src.owl import owl_distribution  # owl.py builds on wanda.py, which imports this module
    return owl_distribution(threshold=config.outlier_threshold, lam=config.owl_lambda)
  return config.distribution


def _shapes(params: Params, chosen: set[str]) -> dict[str, tuple[int, ...]]:
  flat = core.paths.flatten(params)
  return {p: tuple(core.shape_of(flat[p])) for p in sorted(chosen)}


def distribute(params: Params, chosen: set[str], config, *, caller: str) -> dict[str, float]:
  """{path: sparsity} of the chosen kernels under a config.distribution that reads shapes alone ('erk', a
  callable without `stats`), before overrides."""
  d = _resolve(config)
  shapes = _shapes(params, chosen)
  return _checked(_erk(shapes, config.sparsity) if d == 'erk' else d(shapes, config.sparsity), shapes, d, caller)


def dense_pass(model: Model, params: Params, chosen: set[str], config, *,
               caller: str) -> calibration.DensePass | None:
  """The first pass over the dense model a distribution reading its statistics needs ('owl', a callable taking
  `stats`): column norms of every block linear's input, then {path: sparsity} of the chosen kernels the forward
  reaches, overrides applied. None for a distribution of shapes alone. In memory the pass is one
  `calibration.calibrate`; out of core (`calibration.compress_checkpoint`) it streams the checkpoint block by
  block, keeping the column norms only, and reads each block's kernels again for the distribution."""
  d = _resolve(config)
  if d == 'erk' or not wants_statistics(d):
    return None
  shapes = _shapes(params, chosen)
  prefix = f'{model.block_path}/'
  overrides = dict(config.overrides)

  def summarize(stats: Mapping[str, Any], weights: Mapping[str, Any]) -> dict[str, float]:
    reached = {p: s for p, s in shapes.items() if p in stats}  # kernels no forward reaches stay dense anyway
    dense = DenseStatistics(weights=weights, sq_norms={p: stats[p]['sq_norm'] for p in reached},
                            blocks={p: int(p[len(prefix):].split('/', 1)[0]) for p in reached})
    out = _checked(d(reached, config.sparsity, stats=dense), reached, d, caller)
    return masks_lib.apply_overrides(out, overrides)

  return calibration.DensePass(calibration.column_norms(), summarize)


def _erk(shapes: Mapping[str, tuple[int, ...]], sparsity: float) -> dict[str, float]:
  """ERK over the chosen kernels, a stacked expert weight [E, in, out] counting as E kernels [in, out]."""
  per = {f'{p}#{e}': s[-2:] for p, s in shapes.items() for e in range(math.prod(s[:-2]))}
  out = masks_lib.erk_sparsities(per, sparsity)
  return {p: out[f'{p}#0'] for p in shapes}


def _checked(out, shapes: Mapping[str, tuple[int, ...]], distribution, caller: str) -> dict[str, float]:
  if not isinstance(out, Mapping) or set(shapes) - set(out):
    missing = sorted(set(shapes) - set(out)) if isinstance(out, Mapping) else list(shapes)
    raise ValueError(f'{caller}: distribution={distribution!r} returned no sparsity for {missing[:3]}; it must '
                     'return {path: sparsity} for every path of the shapes it is given.')
  return {p: masks_lib.check_sparsity(out[p], caller=f'{caller} distribution[{p!r}]') for p in shapes}
