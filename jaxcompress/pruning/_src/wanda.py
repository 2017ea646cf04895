"""Wanda: pruning by weights and activations (Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models", 2023).

    S[j, o] = |W[j, o]| · ‖X_j‖₂        (W: [in, out]; X_j: the j-th input feature over all calibration tokens)

compared per output (among the inputs of each output column), or in N:M groups of inputs; no weight update.
The layer solvers (`wanda_layer`, `wanda_from_norms`) and the model-level method `wanda`, block by block on the
pruned model's own activations:

    model, params = pruning.wanda(model, params, batches, config=pruning.WandaConfig(pattern='2:4'))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress import calibration, core, registry
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src import masks as masks_lib
from jaxcompress.pruning._src.inputs import check_calibration, check_kernel
from jaxcompress.pruning._src.oneshot import Distribution, check_distribution, check_kernels, sequential


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class WandaConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # fraction of each output's inputs pruned (N:M: 1 - N/M)
  pattern: str | None = None  # None / 'per_output' (the paper), 'per_layer', or 'N:M' such as '2:4'
  rules: core.Rules = core.Rules()  # which block kernels are pruned (recipe: include=, exclude=, embeddings=, head=)
  per_group: bool = False  # re-calibrate each input group (q/k/v, o, gate/up, down) on the pruned block so far
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs for some kernels
  distribution: Distribution = 'uniform'  # per-layer sparsity: 'uniform', 'erk', 'owl' or a callable (oneshot.py)
  outlier_threshold: float = registry.field(5.0, range='(0.0, inf)')  # OWL's M: outlier = score > M × block mean
  owl_lambda: float = registry.field(0.08, range='[0.0, 0.25]')  # OWL's λ: block sparsities within sparsity ± 2λ

  def __post_init__(self):
    masks_lib.parse_pattern(self.pattern, caller='')  # 'N:M' with 0 < N < M, or a named pattern
    check_distribution(self)


def wanda_score(w: jax.Array, col_sq_norms: jax.Array) -> jax.Array:
  """|W| · ‖X_j‖₂ [in, out] float32 from w [in, out] and Σ_t x[t, j]² [in]."""
  norms = jnp.sqrt(jnp.maximum(col_sq_norms.astype(jnp.float32), 0.0))
  return jnp.abs(w.astype(jnp.float32)) * norms[:, None]


def wanda_from_norms(w: jax.Array, col_sq_norms: jax.Array, *, sparsity: float = 0.5,
                     pattern: str | None = None) -> core.Masked:
  """Wanda from streamed statistics: col_sq_norms [in] float (`calibration.column_norms()`'s 'sq_norm').

  pattern: None / 'per_output' (the paper's comparison group), 'per_layer', or 'N:M' such as '2:4'.
  Returns core.Masked(value=w, mask [in, out] bool).
  """
  check_kernel(w, caller='wanda')
  col_sq_norms = jnp.asarray(col_sq_norms)
  if col_sq_norms.shape != (w.shape[0],):
    raise ValueError(f'wanda: col_sq_norms has shape {col_sq_norms.shape}, expected ({w.shape[0]},) '
                     '(one squared norm per input feature of w [in, out]).')
  if not bool(jnp.all(jnp.isfinite(col_sq_norms))):
    raise ValueError('wanda: the calibration statistics hold NaN or inf; check the calibration inputs '
                     '(a model producing inf activations, or NaN tokens embeddings).')
  pattern = 'per_output' if pattern is None else pattern
  mask = masks_lib.mask_from_scores(wanda_score(w, col_sq_norms), sparsity, pattern)
  return core.Masked(value=w, mask=mask)


def wanda_layer(w: jax.Array, x: jax.Array, *, sparsity: float = 0.5, pattern: str | None = None) -> core.Masked:
  """Wanda on one linear layer: w [in, out] float, x [tokens, in] its calibration inputs.

  Returns core.Masked(value=w, mask) with `sparsity` of each output's inputs pruned (or N:M per output).
  """
  x = check_calibration(x, w, caller='wanda_layer')
  xf = x.astype(jnp.float32)
  return wanda_from_norms(w, jnp.sum(xf * xf, axis=0), sparsity=sparsity, pattern=pattern)


def wanda(model: Model, params: Params, calib, *, config: WandaConfig = WandaConfig(),
          **driver_kwargs) -> tuple[Model, Params]:
  """Wanda on every selected block kernel, block by block on the pruned model's own activations.

  calib: a `registry.Context` or a list of calibration batches (token arrays [B, T] or mappings with 'tokens'
  and 'attention_mask'). driver_kwargs: more options of `calibration.run_sequential` (offload, on_step, ...)
  besides the context's mesh.
  """
  ctx = registry.as_context(calib)

  def solve(w, sq_norm, sparsity):
    return wanda_from_norms(w, sq_norm, sparsity=sparsity, pattern=config.pattern)

  def statistic(stats, experts):
    # an expert no calibration token reached: every input counts alike (magnitude pruning)
    return jnp.where((stats['count'] == 0)[:, None], 1.0, stats['sq_norm']) if experts else stats['sq_norm']

  pruned = sequential(model, params, ctx.batches(split=True), calibration.column_norms(), solve, statistic, config,
                      {**ctx.driver_kwargs(), **driver_kwargs})
  return model, registry.local(pruned)


registry.register('wanda', WandaConfig, wanda, family='pruning', forbids=registry.COMPRESSED, adds='masked',
                  calibrated=True, check=check_kernels,
                  paper='Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024)')
