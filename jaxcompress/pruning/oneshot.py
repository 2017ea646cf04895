"""Model-level one-shot pruning: magnitude over the parameters, and Wanda / SparseGPT layer by layer on the
outputs of the already pruned blocks (`calibration.run_sequential`), each kernel solved from streamed statistics.

    params = pruning.sparsegpt(model, params, batches, config=pruning.SparseGPTConfig(pattern='2:4'))

The layer solvers live in `wanda.py` and `sparsegpt.py`; this file only walks the model. Mixture-of-experts
weights ('mlp/up', 'mlp/gate', 'mlp/down' [E, in, out]) count as kernels for include / exclude and are pruned
expert by expert from each expert's routed tokens (`calibration.solve_experts`, over the driver's mesh); an
expert no calibration token reached is pruned by magnitude. The router stays dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp

from jaxcompress import calibration, core
from jaxcompress.core.select import KERNELS
from jaxcompress.models import Model, Params
from jaxcompress.pruning import masks as masks_lib
from jaxcompress.pruning.sparsegpt import sparsegpt_from_hessian
from jaxcompress.pruning.wanda import wanda_from_norms


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeConfig:
  sparsity: float = 0.5  # fraction of each selected kernel pruned (N:M patterns prune 1 - N/M instead)
  pattern: str | None = None  # 'per_layer' (default), 'per_output' or 'N:M' along the input dimension
  distribution: str = 'uniform'  # 'uniform', 'erk' or 'global' (one threshold over all selected kernels)
  include: str | tuple[str, ...] = KERNELS  # path regexes of the kernels to prune
  exclude: str | tuple[str, ...] = ()  # path regexes left dense
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs replacing the distribution's


@dataclasses.dataclass(frozen=True, kw_only=True)
class WandaConfig:
  sparsity: float = 0.5  # fraction of each output's inputs pruned (N:M patterns prune 1 - N/M instead)
  pattern: str | None = None  # None / 'per_output' (the paper), 'per_layer', or 'N:M' such as '2:4'
  include: str | tuple[str, ...] = KERNELS  # path regexes of the block kernels to prune
  exclude: str | tuple[str, ...] = ()  # path regexes left dense
  per_group: bool = False  # re-calibrate each input group (q/k/v, o, gate/up, down) on the pruned block so far
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs for some kernels


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTConfig:
  sparsity: float = 0.5  # fraction pruned, chosen adaptively per block of rows (N:M prunes 1 - N/M instead)
  pattern: str | None = None  # None (unstructured) or 'N:M' such as '2:4'
  block_size: int = 128  # input rows per adaptive-mask block and per lazy update
  damp: float = 0.01  # λ = damp · mean(diag XᵀX) added to the Hessian's diagonal
  include: str | tuple[str, ...] = KERNELS  # path regexes of the block kernels to prune
  exclude: str | tuple[str, ...] = ()  # path regexes left dense
  per_group: bool = True  # true-sequential: later groups of a block see the earlier groups already pruned
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs for some kernels


def magnitude(params: Params, *, config: MagnitudeConfig = MagnitudeConfig(), model: Model | None = None
              ) -> Params:
  """params with the selected kernels `core.Masked` by |W| (model: its head patterns decide what is a head)."""
  rules = _rules(config, model)
  return masks_lib.prune(params, masks_lib.magnitude_score, sparsity=config.sparsity, pattern=config.pattern,
                         distribution=config.distribution, selection=rules, overrides=dict(config.overrides))


def wanda(model: Model, params: Params, batches: Iterable[Any], *, config: WandaConfig = WandaConfig(),
          **driver_kwargs) -> Params:
  """Wanda on every selected block kernel, block by block on the pruned model's own activations.

  batches: as `calibration.calibrate` takes them (token arrays [B, T] or mappings with 'tokens' and
  'attention_mask'). driver_kwargs go to `calibration.run_sequential` (mesh, offload, ...).
  """

  def solve(w, sq_norm, sparsity):
    return wanda_from_norms(w, sq_norm, sparsity=sparsity, pattern=config.pattern)

  def statistic(stats, experts):
    # an expert no calibration token reached: every input counts alike (magnitude pruning)
    return jnp.where((stats['count'] == 0)[:, None], 1.0, stats['sq_norm']) if experts else stats['sq_norm']

  return _sequential(model, params, batches, calibration.column_norms(), solve, statistic, config, driver_kwargs)


def sparsegpt(model: Model, params: Params, batches: Iterable[Any], *,
              config: SparseGPTConfig = SparseGPTConfig(), **driver_kwargs) -> Params:
  """SparseGPT on every selected block kernel, true-sequentially (see `SparseGPTConfig.per_group`)."""

  def solve(w, xtx, sparsity):
    return sparsegpt_from_hessian(w, xtx, sparsity=sparsity, pattern=config.pattern,
                                  block_size=config.block_size, damp=config.damp)

  def statistic(stats, experts):
    # an expert no calibration token reached: white inputs (magnitude pruning)
    return calibration.experts.unseen_identity(stats['xtx'], stats['count']) if experts else stats['xtx']

  return _sequential(model, params, batches, calibration.hessian(), solve, statistic, config, driver_kwargs)


def _rules(config, model: Model | None) -> core.Rules:
  if model is not None:
    return model.selection_rules(include=config.include, exclude=config.exclude)
  return core.Rules(include=config.include, exclude=config.exclude)


def _experts(model: Model, params: Params, rules: core.Rules) -> set[str]:
  """Paths of the stacked expert weights of mixture-of-experts blocks (`model.routed_groups`, e.g.
  'layers/0/mlp/up' [E, d, f]) that `rules` choose: each counts as a kernel ('layers/0/mlp/up/kernel' for the
  include / exclude patterns), so the default include=KERNELS prunes them expert by expert."""
  names = {k for g in model.routed_groups for k in g.kernels}
  flat = core.paths.flatten(params)
  return {f'{model.block_path}/{i}/{k}' for i in range(model.num_layers(params)) for k in names
          if f'{model.block_path}/{i}/{k}' in flat and rules.matches(f'{model.block_path}/{i}/{k}/kernel')}


def _sequential(model, params, batches, observer, solve, statistic, config, driver_kwargs):
  name = type(config).__name__.removesuffix('Config').lower()
  masks_lib.check_sparsity(config.sparsity, caller=name)
  masks_lib.parse_pattern(config.pattern, caller=name)
  rules = _rules(config, model)
  chosen = set(core.select_by(params, rules))
  prefix = f'{model.block_path}/'
  chosen = {p for p in chosen if p.startswith(prefix)} | _experts(model, params, rules)
  if not chosen:
    raise ValueError(f'{name}: include={config.include!r} exclude={config.exclude!r} matches no kernel of the '
                     f"model's blocks; see model.select(params) for the paths.")
  overrides: Mapping[str, float] = dict(config.overrides)
  sparsities = masks_lib.layer_sparsities({p: () for p in chosen}, config.sparsity, 'uniform', overrides)

  def compress_block(i: int, block: Params, stats: dict[str, Any]) -> Params:
    def one(p, w):
      full = f'{model.block_path}/{i}/{p}'
      if full not in chosen or p not in stats:
        return w
      if core.is_compressed(w):
        raise TypeError(f'{name}: {full} is already a {type(w).__name__}; prune dense kernels (materialize '
                        'first, or prune before quantizing).')
      nm = isinstance(masks_lib.parse_pattern(config.pattern), tuple)
      if sparsities[full] == 0 and not nm:
        return w  # an override keeping this kernel dense
      if len(core.shape_of(w)) == 3:  # stacked experts: one solve per expert, spread over the mesh
        return calibration.solve_experts(lambda we, s: solve(we, s, sparsities[full]), w,
                                         statistic(stats[p], True), mesh=driver_kwargs.get('mesh'))
      return solve(w, statistic(stats[p], False), sparsities[full])

    return core.map_with_path(one, block)

  pruned, _ = calibration.run_sequential(model, params, batches, observer, compress_block, keep_stats=False,
                                         per_group=config.per_group, experts=True, **driver_kwargs)
  return pruned
