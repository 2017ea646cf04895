"""Checks of what the layer-level pruners receive: a kernel [in, out] and calibration inputs [tokens, in]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_kernel(w: jax.Array, *, caller: str) -> None:
  if getattr(w, 'ndim', None) != 2:
    raise ValueError(f'{caller}: w must be a kernel [in, out], got shape {getattr(w, "shape", None)}.')
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f'{caller}: w has dtype {w.dtype}; give a float kernel (materialize compressed weights first).')


def check_calibration(x: jax.Array, w: jax.Array, *, caller: str) -> jax.Array:
  """x as an array [tokens, in]: refused when empty, of the wrong width, or holding NaN/inf."""
  check_kernel(w, caller=caller)
  x = jnp.asarray(x)
  if x.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f'{caller}: x has shape {x.shape}; expected [tokens, {w.shape[0]}] (the inputs of w '
                     f'[in, out] = {w.shape}); flatten batch and sequence axes first.')
  if x.shape[0] == 0:
    raise ValueError(f'{caller}: x holds no calibration tokens (shape {x.shape}); give at least one row.')
  bad = int(x.size - np.count_nonzero(np.isfinite(np.asarray(x))))  # on the host: no compile, zero-copy on CPU
  if bad:
    raise ValueError(f'{caller}: the calibration inputs x hold NaN or inf ({bad} NaN/inf entries); clean the data '
                     'or the model first.')
  return x
