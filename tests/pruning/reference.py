"""Slow NumPy float64 pruners written from the papers, in the papers' layout W: [out, in]."""

import numpy as np


def prune_smallest_rows(score: np.ndarray, k: int) -> np.ndarray:
  """Kept mask pruning the k smallest entries of each row of score."""
  keep = np.ones(score.shape, bool)
  for r in range(score.shape[0]):
    keep[r, np.argsort(score[r], kind='stable')[:k]] = False
  return keep


def wanda(w_out_in: np.ndarray, x: np.ndarray, sparsity: float, nm=None) -> np.ndarray:
  """Sun et al. 2023: S = |W| * ||X_j||, each output row compares its inputs (or N:M groups of them)."""
  s = np.abs(w_out_in) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[None, :]
  if nm is None:
    return prune_smallest_rows(s, int(round(sparsity * s.shape[1])))
  n, m = nm
  keep = np.ones(s.shape, bool)
  for g in range(0, s.shape[1], m):
    keep[:, g:g + m] = prune_smallest_rows(s[:, g:g + m], m - n)
  return keep


def ria(w_out_in: np.ndarray, x: np.ndarray, sparsity: float, nm=None, a: float = 0.5) -> np.ndarray:
  """Zhang et al. 2024, in the paper's [out, in] layout: RI_ij = |W_ij| / Σ_row |W_i·| + |W_ij| / Σ_col |W_·j|,
  S_ij = RI_ij · ||X_j||^a, each output row compares its inputs (or N:M groups of them)."""
  w = np.abs(np.asarray(w_out_in, np.float64))
  ri = w / w.sum(axis=1, keepdims=True) + w / w.sum(axis=0, keepdims=True)
  s = ri * (np.sqrt((x.astype(np.float64) ** 2).sum(0)) ** a)[None, :]
  if nm is None:
    return prune_smallest_rows(s, int(round(sparsity * s.shape[1])))
  n, m = nm
  keep = np.ones(s.shape, bool)
  for g in range(0, s.shape[1], m):
    keep[:, g:g + m] = prune_smallest_rows(s[:, g:g + m], m - n)
  return keep


def sparsegpt(w_out_in: np.ndarray, x: np.ndarray, sparsity: float, nm=None, block_size=128, damp=0.01):
  """Frantar & Alistarh 2023, Algorithm 1 with the reference code's choices: H = XᵀX, dead inputs, damping,
  Hinv = upper Cholesky factor of H⁻¹, adaptive mask per block of columns (or N:M per group), lazy updates.
  Returns (reconstructed W [out, in], kept mask)."""
  w = np.array(w_out_in, np.float64)
  x = np.asarray(x, np.float64)
  h = x.T @ x
  cols = w.shape[1]
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[:, dead] = 0
  h = h + damp * np.mean(np.diag(h)) * np.eye(cols)
  hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper U with UᵀU = H⁻¹
  keep = np.ones(w.shape, bool)
  for i1 in range(0, cols, block_size):
    i2 = min(i1 + block_size, cols)
    w1 = w[:, i1:i2].copy()
    q1 = np.zeros_like(w1)
    e1 = np.zeros_like(w1)
    h1 = hinv[i1:i2, i1:i2]
    prune = np.zeros(w1.shape, bool)
    if nm is None:
      tmp = (w1 ** 2 / np.diag(h1)[None, :] ** 2).reshape(-1)
      k = int(round(sparsity * tmp.size))
      prune.reshape(-1)[np.argsort(tmp, kind='stable')[:k]] = True
    for i in range(i2 - i1):
      if nm is not None and i % nm[1] == 0:
        n, m = nm
        tmp = w1[:, i:i + m] ** 2 / np.diag(h1)[None, i:i + m] ** 2
        prune[:, i:i + m] = ~prune_smallest_rows(tmp, m - n)
      wcol = w1[:, i]
      d = h1[i, i]
      q = wcol.copy()
      q[prune[:, i]] = 0
      q1[:, i] = q
      err = (wcol - q) / d
      w1[:, i:] -= np.outer(err, h1[i, i:])
      e1[:, i] = err
    w[:, i1:i2] = q1
    keep[:, i1:i2] = ~prune
    w[:, i2:] -= e1 @ hinv[i1:i2, i2:]
  return w, keep
