"""NumPy float64 implementations written from the papers, in the papers' layout, for the reference tests."""

from __future__ import annotations

import numpy as np


def grid(w, bits, symmetric, mse=False, p=1.0):
  """Per-row (paper layout: one output row) grid of a group w [out, cols] -> scale, zero [out], the range shrunk
  by p. mse: the GPTQ authors' search (their Quantizer with mse=True, grid=100, maxshrink=0.8, norm=2.4): for
  p = 1 - i/100, i = 0 .. 79, each row keeps the first p whose Σ_cols |Q(w) - w|^2.4 is least."""
  if mse:
    scale, zero = grid(w, bits, symmetric)
    best = (np.abs(quant(w, scale[:, None], zero[:, None], bits, symmetric)[1] - w) ** 2.4).sum(axis=1)
    for i in range(1, 80):
      s, z = grid(w, bits, symmetric, p=1 - i / 100)
      err = (np.abs(quant(w, s[:, None], z[:, None], bits, symmetric)[1] - w) ** 2.4).sum(axis=1)
      better = err < best
      scale, zero, best = np.where(better, s, scale), np.where(better, z, zero), np.where(better, err, best)
    return scale, zero
  if symmetric:
    scale = p * np.abs(w).max(axis=1) / (2 ** (bits - 1) - 1)
    scale = np.where(scale == 0, 1.0, scale)
    return scale, np.full_like(scale, 2 ** (bits - 1))
  lo, hi = p * np.minimum(w.min(axis=1), 0), p * np.maximum(w.max(axis=1), 0)
  scale = (hi - lo) / (2 ** bits - 1)
  scale = np.where(scale == 0, 1.0, scale)
  return scale, np.round(-lo / scale)


def quant(x, scale, zero, bits, symmetric):
  q = np.clip(np.round(x / scale) + zero, 1 if symmetric else 0, 2 ** bits - 1)
  return q, scale * (q - zero)


def gptq(W, H, *, bits, groupsize=None, act_order=False, symmetric=False, blocksize=128, percdamp=0.01, mask=None,
         static_groups=True, return_g_idx=False, mse=False):
  """Algorithm 1 of Frantar et al. (2023) as in the authors' reference: W [out, in] (rows = outputs), H [in, in].

  mask [out, in] bool (kept weights), as in SparseGPT's joint sparsification and quantization (Frantar &
  Alistarh 2023): a pruned weight's quantized value is 0, so its whole value is error, and grids span kept weights.

  Returns codes [out, in], the dequantized weight [out, in], scales and zeros [out, groups] (and, with
  return_g_idx, each input's group [in]). Groups with act_order: static_groups=True takes every group's
  parameters from the unmodified W in the original order; static_groups=False is the authors' default: group g
  is permuted columns g·gs ... (g+1)·gs − 1, its parameters from W as updated when the loop reaches its first
  column, and g_idx[j] = (position of column j in the permuted order) // gs. mse: each group's grid from the
  authors' clipping search (`grid`).
  """
  W = np.array(W, np.float64)
  H = np.array(H, np.float64)
  rows, cols = W.shape
  M = np.ones(W.shape, bool) if mask is None else np.asarray(mask, bool)
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  gs = cols if groupsize is None else groupsize
  ng = cols // gs
  S = np.zeros((rows, ng))
  Z = np.zeros((rows, ng))
  static = groupsize is None or (act_order and static_groups)
  if static:
    for g in range(ng):
      S[:, g], Z[:, g] = grid((W * M)[:, g * gs:(g + 1) * gs], bits, symmetric, mse)
  perm = np.argsort(-np.diag(H), kind='stable') if act_order else np.arange(cols)
  W = W[:, perm]
  H = H[perm][:, perm]
  M = M[:, perm]
  H = H + percdamp * np.mean(np.diag(H)) * np.eye(cols)
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper
  Q = np.zeros_like(W)
  C = np.zeros_like(W)
  for i1 in range(0, cols, blocksize):
    i2 = min(i1 + blocksize, cols)
    W1 = W[:, i1:i2].copy()
    Err1 = np.zeros_like(W1)
    H1 = Hinv[i1:i2, i1:i2]
    for i in range(i2 - i1):
      g = perm[i1 + i] // gs if static else (i1 + i) // gs
      if not static and (i1 + i) % gs == 0:
        S[:, g], Z[:, g] = grid((W * M)[:, i1 + i:i1 + i + gs], bits, symmetric, mse)
      w = W1[:, i]
      d = H1[i, i]
      c, q = quant(w, S[:, g], Z[:, g], bits, symmetric)
      q = q * M[:, i1 + i]
      Q[:, i1 + i] = q
      C[:, i1 + i] = c
      err = (w - q) / d
      W1[:, i:] -= np.outer(err, H1[i, i:])
      Err1[:, i] = err
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
  inv = np.argsort(perm)
  g_idx = inv // gs if not static else np.arange(cols) // gs
  return (C[:, inv], Q[:, inv], S, Z, g_idx) if return_g_idx else (C[:, inv], Q[:, inv], S, Z)


def rtn(W, *, bits, groupsize=None, symmetric=False):
  """Round-to-nearest on the same grid. W [out, in] -> dequantized [out, in]."""
  rows, cols = W.shape
  gs = cols if groupsize is None else groupsize
  out = np.zeros_like(W, dtype=np.float64)
  for g in range(cols // gs):
    blk = W[:, g * gs:(g + 1) * gs].astype(np.float64)
    s, z = grid(blk, bits, symmetric)
    out[:, g * gs:(g + 1) * gs] = quant(blk, s[:, None], z[:, None], bits, symmetric)[1]
  return out


def awq(W, X, *, bits, groupsize, n_grid=20, max_shrink=0.5, symmetric=False):
  """AWQ (Lin et al. 2024) on a layer W [out, in] with inputs X [tokens, in]: the scale search over α minimising
  the mean squared output error, then the per-(output, group) clipping search. Returns the effective weight
  [out, in] (the quantized scaled weight divided by s) and s."""
  W = np.asarray(W, np.float64)
  X = np.asarray(X, np.float64)
  rows, cols = W.shape
  Y = X @ W.T
  xm = np.abs(X).mean(0)

  def fq(w):  # [out, in] fake quantization per group of inputs
    return rtn(w, bits=bits, groupsize=groupsize, symmetric=symmetric)

  def scales(a):
    s = np.maximum(xm ** a, 1e-4)
    return s / np.sqrt(s.max() * s.min())

  losses = [np.mean((Y - X @ (fq(W * scales(a / n_grid)) / scales(a / n_grid)).T) ** 2) for a in range(n_grid)]
  s = scales(int(np.argmin(losses)) / n_grid)
  Ws, Xs = W * s, X / s
  gs = cols if groupsize is None else groupsize
  out = np.zeros_like(Ws)
  for g in range(cols // gs):
    sl = slice(g * gs, (g + 1) * gs)
    w, x = Ws[:, sl], Xs[:, sl]
    top = np.abs(w).max(1, keepdims=True)
    best, best_w = np.full(rows, np.inf), None
    for i in range(int(max_shrink * n_grid)):
      c = np.clip(w, -top * (1 - i / n_grid), top * (1 - i / n_grid))
      q = rtn(c, bits=bits, groupsize=None, symmetric=symmetric)
      err = np.mean((x @ w.T - x @ q.T) ** 2, axis=0)
      better = err < best
      best = np.where(better, err, best)
      best_w = q if best_w is None else np.where(better[:, None], q, best_w)
    out[:, sl] = best_w
  return out / s, s
