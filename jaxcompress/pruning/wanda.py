"""Wanda: pruning by weights and activations (Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models", 2023).

    S[j, o] = |W[j, o]| · ‖X_j‖₂        (W: [in, out]; X_j: the j-th input feature over all calibration tokens)

compared per output (among the inputs of each output column), or in N:M groups of inputs; no weight update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.pruning import masks as masks_lib
from jaxcompress.pruning.inputs import check_calibration, check_kernel


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
