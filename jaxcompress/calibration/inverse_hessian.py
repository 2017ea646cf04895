"""The input Hessian of one linear layer, as the one-shot layer solvers (SparseGPT, GPTQ) use it.

With w: [in, out] and calibration inputs x: [tokens, in], both solvers need H = XᵀX over the inputs, damped, and
the upper triangular U with UᵀU = H⁻¹ (the papers' "Cholesky of the inverse"). This module is that shared part:

    h = xtx(x)                                              # [in, in] float32, one GEMM
    f = inverse_factor(h, damp=0.01, caller='gptq')         # U, dead inputs, damping actually used

Dead inputs (H[j, j] = 0: an input never active on the calibration data) get H[j, j] = 1, as in the reference
implementations of both papers; their weight rows do not touch the output, so the solvers zero them. H is
scaled by 1 / mean(diag H) (the solvers are invariant to H's scale; this keeps float32 far from its range
limits) and damp · I is added, i.e. λ = damp · mean(diag H) as in the papers. When H + λI is not positive
definite in the working precision the factor comes out non-finite; `inverse_factor` then multiplies damp by 10,
says so (absl warning and a RuntimeWarning), and tries again, so a solver never sees a NaN factor.

U costs one O(n³) pass of matmuls (`inverse_cholesky_upper`): XLA's CPU Cholesky followed by a triangular solve
is about 1.5× slower in the same run, and the dense inverse followed by a Cholesky (the papers' route) 3×.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def check_finite(a, name: str, caller: str) -> None:
  """ValueError naming `name` when a holds NaN or inf (host check: no compile, zero-copy on CPU)."""
  a = np.asarray(a)
  bad = int(a.size - np.count_nonzero(np.isfinite(a)))
  if bad:
    raise ValueError(f'{caller}: {name} has {bad} NaN/inf entries of {a.size} (a NaN or inf makes every solved '
                     'weight meaningless); clean the weights or the calibration data (or the model producing it) '
                     'first.')


@jax.jit
def xtx(x: jax.Array) -> jax.Array:
  """XᵀX [in, in] float32 from x [tokens, in] (HIGHEST: accelerators would otherwise use bf16 passes)."""
  xf = x.astype(jnp.float32)
  return jnp.matmul(xf.T, xf, precision=HIGHEST)


def inverse_cholesky_lower(a: jax.Array, leaf: int = 1024) -> jax.Array:
  """L⁻¹ [n, n] lower triangular, where a = LLᵀ is symmetric positive definite (non-finite when it is not).

  Blocked by halves, so nearly all the work is matmuls (XLA's CPU Cholesky and triangular solve are slower per
  flop than its matmul): with a = [[A, Bᵀ], [B, C]],
      L₁⁻¹ = rec(A),  L₂₁ = B L₁⁻ᵀ,  L₂⁻¹ = rec(C - L₂₁ L₂₁ᵀ),  (L⁻¹)₂₁ = -L₂⁻¹ L₂₁ L₁⁻¹.
  The recursion has depth log2(n / leaf), fixed by n: one compile per layer shape.
  """
  n = a.shape[0]
  if n <= leaf:
    chol = jnp.linalg.cholesky(a)
    return lax.linalg.triangular_solve(chol, jnp.eye(n, dtype=a.dtype), left_side=True, lower=True)
  m = n // 2
  inv1 = inverse_cholesky_lower(a[:m, :m], leaf)
  l21 = jnp.matmul(a[m:, :m], inv1.T, precision=HIGHEST)
  schur = a[m:, m:] - jnp.matmul(l21, l21.T, precision=HIGHEST)
  inv2 = inverse_cholesky_lower((schur + schur.T) / 2, leaf)
  inv21 = -jnp.matmul(jnp.matmul(inv2, l21, precision=HIGHEST), inv1, precision=HIGHEST)
  top = jnp.concatenate([inv1, jnp.zeros((m, n - m), a.dtype)], axis=1)
  return jnp.concatenate([top, jnp.concatenate([inv21, inv2], axis=1)], axis=0)


def inverse_cholesky_upper(h: jax.Array) -> jax.Array:
  """U upper triangular [n, n] with UᵀU = h⁻¹ (h symmetric positive definite).

  With P the reversal, PhP = LLᵀ gives h = (PLP)(PLᵀP) and h⁻¹ = (P L⁻ᵀ P)(P L⁻¹ P), where P L⁻¹ P is upper
  triangular: one Cholesky and one triangular inverse, never the dense inverse.
  """
  return inverse_cholesky_lower(h[::-1, ::-1])[::-1, ::-1]


def damped(h: jax.Array, damp) -> tuple[jax.Array, jax.Array]:
  """(H / mean(diag H) + damp · I with dead inputs' diagonal set to 1 first, dead [in] bool).

  h: [in, in] float (any positive multiple of XᵀX). Dead means H[j, j] == 0. The scale is mean(|diag H|), which
  is mean(diag H) for any XᵀX and keeps an invalid negative diagonal negative (so it fails, never flips sign).
  """
  diag = jnp.diagonal(h)
  dead = diag == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0).astype(h.dtype))
  h = h / jnp.mean(jnp.abs(jnp.diagonal(h)))
  return h + jnp.asarray(damp, h.dtype) * jnp.eye(h.shape[0], dtype=h.dtype), dead


@functools.partial(jax.jit, static_argnames=('act_order',))
def _factor(h, damp, *, act_order):
  n = h.shape[0]
  hd, dead = damped(h, damp)
  # act-order: inputs by decreasing diag(H) (dead ones, now 1, in their place), stable for reproducibility
  perm = jnp.argsort(-jnp.diagonal(hd), stable=True) if act_order else jnp.arange(n)
  if act_order:
    hd = hd[perm][:, perm]
  u = inverse_cholesky_upper(hd)
  return u, dead, perm, jnp.all(jnp.isfinite(u))


@dataclasses.dataclass(frozen=True)
class Factor:
  """The upper Cholesky factor of the damped inverse Hessian of one layer."""
  u: jax.Array  # [in, in] upper triangular, UᵀU = (H/mean(diag H) + damp·I)⁻¹, in the order of `perm`
  dead: jax.Array  # [in] bool, inputs with H[j, j] == 0 (original order): their weights should be zeroed
  perm: jax.Array  # [in] int32, the solver's order of inputs (arange, or decreasing diag(H) with act_order)
  damp: float  # the damping that succeeded (raised from the requested one when H + λI was not PD)


def inverse_factor(h: jax.Array, *, damp: float = 0.01, caller: str = 'hessian', act_order: bool = False,
                   max_tries: int = 6) -> Factor:
  """U with UᵀU = (H + λI)⁻¹ for h = XᵀX [in, in] (float32, or float64 under jax_enable_x64).

  damp: λ = damp · mean(diag H), > 0. When the factor is not finite (H + λI not positive definite in the working
  precision), damp is multiplied by 10 up to `max_tries` times, each time with an absl warning and a
  RuntimeWarning; after that, ValueError. Raises ValueError when h is not [n, n], holds NaN/inf, or is zero
  (no calibration signal). Returns a `Factor` (what damp finally was is in `Factor.damp`).
  """
  h = jnp.asarray(h)
  if h.ndim != 2 or h.shape[0] != h.shape[1]:
    raise ValueError(f'{caller}: the Hessian must be square [in, in], got shape {h.shape}.')
  if not damp > 0:
    raise ValueError(f'{caller}: damp={damp!r} must be > 0 (fraction of mean(diag H) added to the diagonal; '
                     'the papers use 0.01).')
  hn = np.asarray(h)
  check_finite(hn, 'the Hessian XᵀX (calibration inputs)', caller)
  if not np.any(np.diagonal(hn) != 0):
    raise ValueError(f'{caller}: the Hessian is zero (no calibration token reached this layer, or every input is '
                     '0); give calibration data that exercises the layer.')
  if not jnp.issubdtype(h.dtype, jnp.floating) or h.dtype.itemsize < 4:
    h = h.astype(jnp.float32)
  d = float(damp)
  for attempt in range(max_tries + 1):
    u, dead, perm, ok = _factor(h, jnp.asarray(d, h.dtype), act_order=bool(act_order))
    if bool(ok):
      return Factor(u=u, dead=dead, perm=perm, damp=d)
    if attempt == max_tries:
      break
    msg = (f'{caller}: H + {d:g}·mean(diag H)·I is not positive definite in {h.dtype}; raising damp to '
           f'{d * 10:g}.')
    logging.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    d *= 10
  raise ValueError(f'{caller}: the Hessian is not positive definite even with damp={d:g}; check the calibration '
                   'inputs (too few tokens or degenerate features) or raise damp.')


def lazy_update(w: jax.Array, u_rows: jax.Array, err: jax.Array, start: jax.Array) -> jax.Array:
  """w - u_rowsᵀ err, computed only for the rows from `start` on (the ones before have U entries 0).

  w: [n, out]; u_rows: [b, n] rows of U for one block (zero left of `start`, U being upper triangular); err: [b,
  out]; start: the block's first row (traced, a multiple of b); n must divide by b. The rows go b at a time
  through a loop that updates w in place, so besides w the update needs one [b, out] slab, not an [n, out]
  product (hundreds of MiB for the widest layers), and its work shrinks with the block index.
  """
  n, out = w.shape
  b = u_rows.shape[0]

  def chunk(c, w):
    r = c * b
    rows = lax.dynamic_slice(w, (r, 0), (b, out))
    upd = jnp.matmul(lax.dynamic_slice(u_rows, (0, r), (b, b)).T, err, precision=HIGHEST)
    return lax.dynamic_update_slice(w, rows - upd, (r, 0))

  return lax.fori_loop(start // b, n // b, chunk, w)


def sub_block_size(block_size: int, m: int = 1, target: int = 16) -> int:
  """Rows solved one by one before a matmul updates the rest of their block: a multiple of m dividing
  block_size, ≤ target where possible (the rank-1 updates then touch a [target, out] slab that stays in cache)."""
  groups = block_size // m
  best = 1
  for g in range(1, groups + 1):
    if groups % g == 0 and g * m <= max(target, m):
      best = g
  return best * m


def inverse_factor_inplace(h: np.ndarray, *, damp: float = 0.01, caller: str = 'hessian',
                           max_tries: int = 6) -> Factor:
  """`inverse_factor` on the host, overwriting h: peak memory one [in, in] matrix instead of about four.

  h: [in, in] float32 C-contiguous writable numpy XᵀX; on return it holds U (upper triangular, UᵀU =
  (H/mean(diag H) + damp·I)⁻¹, input order: no act-order), and `Factor.u` is h itself. Same damping, dead
  inputs and retries as `inverse_factor`; the factor comes from LAPACK (potrf + trtri on the reversed
  matrix), so it equals `inverse_factor`'s to float32 rounding, not bit for bit. For the widest layers of a
  large model on a small host (an [8192, 8192] float32 XᵀX is 256 MiB).
  """
  from scipy.linalg import lapack
  if not (isinstance(h, np.ndarray) and h.dtype == np.float32 and h.ndim == 2 and h.shape[0] == h.shape[1]
          and h.flags.c_contiguous and h.flags.writeable):
    raise ValueError(f'{caller}: inverse_factor_inplace needs a writable C-contiguous float32 numpy [n, n] '
                     f'array, got {type(h).__name__} {getattr(h, "dtype", "?")} {getattr(h, "shape", "?")}; copy '
                     'it with np.array(h, np.float32).')
  if not damp > 0:
    raise ValueError(f'{caller}: damp={damp!r} must be > 0 (fraction of mean(diag H) added to the diagonal; '
                     'the papers use 0.01).')
  n = h.shape[0]
  for r in range(0, n, 1024):  # row chunks: no [n, n] temporary
    check_finite(h[r:r + 1024], 'the Hessian XᵀX (calibration inputs)', caller)
  diag = h.reshape(-1)[::n + 1]  # a writable view of the diagonal
  dead = diag == 0
  if dead.all():
    raise ValueError(f'{caller}: the Hessian is zero (no calibration token reached this layer, or every input is '
                     '0); give calibration data that exercises the layer.')
  diag[dead] = 1.0
  h *= np.float32(1.0 / np.mean(np.abs(diag), dtype=np.float64))
  _reverse_inplace(h)  # P H P (P the reversal): its lower Cholesky factor gives U = P L⁻¹ P
  base = diag.copy()
  d = float(damp)
  for attempt in range(max_tries + 1):
    diag[:] = base + np.float32(d)
    # h.T is h's memory in Fortran order; its upper triangle there is h's lower triangle here, so potrf and
    # trtri work in place on h's lower triangle (= L, then L⁻¹) and leave its strict upper triangle alone
    _, info = lapack.spotrf(h.T, lower=0, clean=0, overwrite_a=1)
    if info == 0:
      _, info = lapack.strtri(h.T, lower=0, overwrite_c=1)
      if info == 0 and np.isfinite(diag).all():
        break
    if attempt == max_tries:
      raise ValueError(f'{caller}: the Hessian is not positive definite even with damp={d:g}; check the '
                       'calibration inputs (too few tokens or degenerate features) or raise damp.')
    for i in range(1, n):  # the lower triangle back from the untouched upper one
      h[i, :i] = h[:i, i]
    msg = (f'{caller}: H + {d:g}·mean(diag H)·I is not positive definite in float32; raising damp to '
           f'{d * 10:g}.')
    logging.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    d *= 10
  for i in range(n - 1):  # the strict upper triangle still holds H: zero it, leaving L⁻¹
    h[i, i + 1:] = 0
  _reverse_inplace(h)
  return Factor(u=h, dead=dead, perm=np.arange(n, dtype=np.int32), damp=d)


def aligned_copy(x) -> np.ndarray:
  """A writable C-contiguous float32 host copy of x whose data starts on a 64-byte boundary, so that after
  `inverse_factor_inplace` jax.device_put on CPU shares its memory instead of copying another [in, in]."""
  shape = tuple(np.shape(x))
  n = int(np.prod(shape)) * 4
  raw = np.empty(n + 64, np.uint8)
  off = (-raw.ctypes.data) % 64
  out = raw[off:off + n].view(np.float32).reshape(shape)
  np.copyto(out, np.asarray(x), casting='same_kind')
  return out


def _reverse_inplace(a: np.ndarray) -> None:
  """a[:] = a[::-1, ::-1] a row pair at a time (numpy would copy the whole matrix for the overlap)."""
  n = a.shape[0]
  for i in range(n // 2):
    top = a[i, ::-1].copy()
    a[i] = a[n - 1 - i, ::-1]
    a[n - 1 - i] = top
  if n % 2:
    a[n // 2] = a[n // 2, ::-1].copy()
