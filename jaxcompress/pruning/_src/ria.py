"""RIA: relative importance and activations (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning
Method for Large Language Models", ICLR 2024).

A weight's importance relative to the other weights of its output and of its input, times its input's norm:

    RI[j, o] = |W[j, o]| / Σ_j' |W[j', o]|  +  |W[j, o]| / Σ_o' |W[j, o']|        (W: [in, out])
    S[j, o]  = RI[j, o] · ‖X_j‖₂^a                                                 (a = 0.5 in the paper)

compared, as Wanda's score, among the inputs of each output (or in N:M groups of inputs); no weight update. The
first term favours weights large for their output, the second weights large for their input, so an input
channel or output channel with small weights everywhere is not pruned away whole. Block by block on the pruned
model's own activations, through the same driver as Wanda (its per-layer `distribution` axis included):

    model, params = pruning.ria(model, params, batches, config=pruning.RIAConfig(sparsity=0.5))
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
class RIAConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # fraction of each output's inputs pruned (N:M: 1 - N/M)
  pattern: str | None = None  # None / 'per_output' (the paper), 'per_layer', or 'N:M' such as '2:4'
  activation_power: float = registry.field(0.5, range='[0.0, inf)')  # a: the exponent of ‖X_j‖₂
  rules: core.Rules = core.Rules()  # which block kernels are pruned (recipe: include=, exclude=)
  per_group: bool = False  # re-calibrate each input group (q/k/v, o, gate/up, down) on the pruned block so far
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs for some kernels
  distribution: Distribution = 'uniform'  # per-layer sparsity: 'uniform', 'erk', 'owl' or a callable (oneshot.py)
  outlier_threshold: float = registry.field(5.0, range='(0.0, inf)')  # OWL's M (distribution='owl')
  owl_lambda: float = registry.field(0.08, range='[0.0, 0.25]')  # OWL's λ (distribution='owl')

  def __post_init__(self):
    masks_lib.parse_pattern(self.pattern, caller='')  # 'N:M' with 0 < N < M, or a named pattern
    check_distribution(self)


def ria_score(w: jax.Array, col_sq_norms: jax.Array, activation_power: float = 0.5) -> jax.Array:
  """RI · ‖X_j‖₂^a [in, out] float32 from w [in, out] and Σ_t x[t, j]² [in]. A row or column of zeros adds 0."""
  a = jnp.abs(w.astype(jnp.float32))
  per_output = jnp.sum(a, axis=0, keepdims=True)  # Σ_j' |W[j', o]|  [1, out]
  per_input = jnp.sum(a, axis=1, keepdims=True)  # Σ_o' |W[j, o']|  [in, 1]
  ri = a / jnp.where(per_output == 0, 1.0, per_output) + a / jnp.where(per_input == 0, 1.0, per_input)
  norms = jnp.sqrt(jnp.maximum(col_sq_norms.astype(jnp.float32), 0.0))
  return ri * (norms ** activation_power)[:, None]


def ria_from_norms(w: jax.Array, col_sq_norms: jax.Array, *, sparsity: float = 0.5, pattern: str | None = None,
                   activation_power: float = 0.5) -> core.Masked:
  """RIA from streamed statistics: col_sq_norms [in] float (`calibration.column_norms()`'s 'sq_norm').
  Returns core.Masked(value=w, mask [in, out] bool)."""
  check_kernel(w, caller='ria')
  col_sq_norms = jnp.asarray(col_sq_norms)
  if col_sq_norms.shape != (w.shape[0],):
    raise ValueError(f'ria: col_sq_norms has shape {col_sq_norms.shape}, expected ({w.shape[0]},) (one squared '
                     'norm per input feature of w [in, out]).')
  if not bool(jnp.all(jnp.isfinite(col_sq_norms))):
    raise ValueError('ria: the calibration statistics hold NaN or inf; check the calibration inputs.')
  pattern = 'per_output' if pattern is None else pattern
  mask = masks_lib.mask_from_scores(ria_score(w, col_sq_norms, activation_power), sparsity, pattern)
  return core.Masked(value=w, mask=mask)


def ria_layer(w: jax.Array, x: jax.Array, *, sparsity: float = 0.5, pattern: str | None = None,
              activation_power: float = 0.5) -> core.Masked:
  """RIA on one linear layer: w [in, out] float, x [tokens, in] its calibration inputs."""
  x = check_calibration(x, w, caller='ria_layer')
  xf = x.astype(jnp.float32)
  return ria_from_norms(w, jnp.sum(xf * xf, axis=0), sparsity=sparsity, pattern=pattern,
                        activation_power=activation_power)


def ria(model: Model, params: Params, calib, *, config: RIAConfig = RIAConfig(),
        **driver_kwargs) -> tuple[Model, Params]:
  """RIA on every selected block kernel, block by block on the pruned model's own activations. calib: a
  `registry.Context` or a list of calibration batches; driver_kwargs: more options of
  `calibration.run_sequential` (offload, on_step, ...)."""
  ctx = registry.as_context(calib)

  def solve(w, sq_norm, sparsity):
    return ria_from_norms(w, sq_norm, sparsity=sparsity, pattern=config.pattern,
                          activation_power=config.activation_power)

  def statistic(stats, experts):
    # an expert no calibration token reached: every input counts alike (relative importance alone)
    return jnp.where((stats['count'] == 0)[:, None], 1.0, stats['sq_norm']) if experts else stats['sq_norm']

  pruned = sequential(model, params, ctx.batches(split=True), calibration.column_norms(), solve, statistic, config,
                      {**ctx.driver_kwargs(), **driver_kwargs})
  return model, registry.local(pruned)


registry.register('ria', RIAConfig, ria, family='pruning', forbids=registry.COMPRESSED, adds='masked',
                  calibrated=True, check=check_kernels,
                  paper='Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language '
                  'Models" (ICLR 2024)')
