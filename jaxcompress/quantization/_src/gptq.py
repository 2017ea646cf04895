"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar et al., ICLR 2023).

Layout. The paper's weight is [out, in] and quantizes one input column at a time; ours is [in, out], so the
solver walks the rows of w (input features). H = XᵀX is over the input dimension (its scale does not matter:
damping is relative to mean(diag H)). With U the upper Cholesky factor of (H + λI)⁻¹, for every input row i

    q_i = Q(w_i);   e_i = (w_i − q_i) / U_ii;   w_j −= U_ij · e_i   for j > i

applied lazily: inside a block of `block_size` rows the update touches only the block, and the rows after the
block receive U[block, :]ᵀ · E once per block (Algorithm 1 of the paper). Both loops are `lax.fori_loop`s over
dynamic slices, so one layer shape compiles once whatever its width.

Grids. `symmetric=False` (default) is the authors' asymmetric min-max grid (scale = (max − min) / (2^b − 1),
integer zero point; min ≤ 0 ≤ max), `symmetric=True` the symmetric grid of `core.quantize`. Per-channel
(`group_size=None`): one scale per output column from the whole weight. Groups: a group's scale and zero are
computed when the solver reaches the group's first row, from the weights as updated by the previous blocks (the
reference implementation's order). With `act_order=True` rows are visited by decreasing diag(H); with groups,
`static_groups=True` (default) computes the group parameters once from the unmodified weights in the original
order, so groups stay contiguous in the stored leaf; `static_groups=False` is the authors' default: a group is
the next `group_size` rows of the act-order, its grid formed when the solver reaches it, and the leaf holds
`g_idx` (each input's group). Codes come back in the original row order.

`mse=True` is the authors' clipping search (their `Quantizer(mse=True)`): each column of a group tries the range
shrunk to p·[min, max] (symmetric: p·absmax) for p = 1, 0.99, ..., 0.21, and keeps the p whose rounding error
Σ_rows |Q(w) − w|^2.4 over the group is least (the first such p on a tie). The grid is then the same affine grid,
so the leaf and every export are unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxcompress import calibration, core, registry
from jaxcompress.calibration import inverse_hessian
from jaxcompress.quantization._src import common
from jaxcompress.quantization._src.common import check_bits, check_group_size, make_leaf
from jaxcompress.quantization._src.quantizers import int_grid

# The authors' clipping search (`mse=True`): shrink factors 1 - i / MSE_GRID for i < MSE_MAXSHRINK · MSE_GRID,
# each scored by Σ |Q(w) − w|^MSE_NORM over the group's rows.
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4


def grid_params(w: jax.Array, bits: int, symmetric: bool, mse: bool = False) -> tuple[jax.Array, jax.Array]:
  """Scale and zero point per column of one group. w: [rows, out] -> scale [out], zero [out] (code units).

  Asymmetric: min-max over the group with 0 inside the range; symmetric: absmax / (2^(b-1) - 1), zero 2^(b-1).
  A group of zeros gets scale 1 (no division by zero; its codes decode to 0). mse: the range shrunk by the factor
  (of `MSE_GRID` steps down to 1 − `MSE_MAXSHRINK`) whose rounding error Σ_rows |Q(w) − w|^`MSE_NORM` is least,
  per column.
  """
  if not mse:
    return _shrunk_grid(w, bits, symmetric, 1.0)

  def error(scale, zero):
    return jnp.sum(jnp.abs(_encode(w, scale, zero, bits, symmetric)[1] - w) ** MSE_NORM, axis=0)

  def candidate(i, best):
    scale, zero, err = best
    s, z = _shrunk_grid(w, bits, symmetric, 1.0 - i / MSE_GRID)
    e = error(s, z)
    better = e < err
    return jnp.where(better, s, scale), jnp.where(better, z, zero), jnp.where(better, e, err)

  scale, zero = _shrunk_grid(w, bits, symmetric, 1.0)
  scale, zero, _ = jax.lax.fori_loop(1, int(MSE_MAXSHRINK * MSE_GRID), candidate, (scale, zero, error(scale, zero)))
  return scale, zero


def _shrunk_grid(w, bits, symmetric, p):
  """The grid of each column's range [min(w), max(w)] ∋ 0 shrunk by p."""
  return int_grid(p * jnp.minimum(w.min(axis=0), 0.0), p * jnp.maximum(w.max(axis=0), 0.0), bits, symmetric)


def _encode(w, scale, zero, bits, symmetric):
  """One row (or rows) w: [..., out] -> (codes float, dequantized)."""
  lo = 1 if symmetric else 0  # the symmetric grid leaves the lowest code unused, as core.quantize
  q = jnp.clip(jnp.round(w / scale) + zero, lo, 2 ** bits - 1)
  return q, (q - zero) * scale


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'act_order', 'symmetric', 'block_size',
                                             'static_groups', 'mse'))
def _solve(w, u, dead, perm, mask=None, *, bits, group_size, act_order, symmetric, block_size, static_groups=True,
           mse=False):
  """The GPTQ solver: w [in, out] float, u [in, in] the upper factor of the damped H⁻¹ in the order `perm` [in],
  dead [in] bool (original order) -> (codes [in, out] uint8, scale, zero [G, out]). With act_order and
  static_groups=False, group g is rows g·gs ... (g+1)·gs − 1 of the permuted order (its grid formed when the
  solver reaches it), so the caller's leaf needs g_idx = position in the permuted order // gs.

  mask [in, out] bool or None: the weights a pruning kept. A pruned weight decodes to 0 (it is masked in the
  model), so its whole value is the error the later rows compensate, and the grids span the kept weights only
  (SparseGPT's joint sparsification and quantization, with the mask given)."""
  n, out = w.shape
  dtype = jnp.promote_types(w.dtype, jnp.float32)
  w = w.astype(dtype)  # here, not by the caller: a bf16 argument is half the bytes
  u = u.astype(dtype)
  w = jnp.where(dead[:, None], 0.0, w)  # inputs that are always zero (H_ii = 0): their weights do not matter
  kept = (lambda v, m: v) if mask is None else (lambda v, m: jnp.where(m, v, 0.0))
  gs = n if group_size is None else group_size
  groups = n // gs
  static = group_size is None or (act_order and static_groups)  # parameters known before the solver runs
  if static:
    sp, zp = jax.vmap(lambda g: grid_params(g, bits, symmetric, mse))(kept(w, mask).reshape(groups, gs, out))
  else:
    sp = zp = jnp.ones((groups, out), dtype)
  if act_order:
    w = w[perm]
    mask = None if mask is None else mask[perm]

  # pad to whole blocks: padded rows come last, are dead (U = I there) and are dropped at the end
  nb = -(-n // block_size)
  pad = nb * block_size - n
  if pad:  # (without padding, no [in, in] copy of u: the widest layers' factor is hundreds of MiB)
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.r_[jnp.zeros(n, dtype), jnp.ones(pad, dtype)])
    mask = None if mask is None else jnp.pad(mask, ((0, pad), (0, 0)))
  # each solver row's group: in the stored (original-order) leaf, or (dynamic act-order) in the permuted order
  gidx = jnp.pad(perm // gs if static else jnp.arange(n) // gs, (0, pad))
  sub = inverse_hessian.sub_block_size(block_size)

  def block(b, carry):
    w, q_all, sp, zp = carry
    i1 = b * block_size
    w1 = jax.lax.dynamic_slice_in_dim(w, i1, block_size, 0)
    u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))
    m1 = None if mask is None else jax.lax.dynamic_slice_in_dim(mask, i1, block_size, 0)

    def column(r, i, c):
      w2, e2, q2, sp, zp, u2 = c
      row = i1 + r + i
      g = gidx[row]
      if not static:  # a group starts here: its grid from the weights as the previous blocks left them
        def fresh(spz):
          start = jnp.minimum(row, n - gs)
          s, z = grid_params(kept(jax.lax.dynamic_slice_in_dim(w, start, gs, 0),
                                  None if mask is None else jax.lax.dynamic_slice_in_dim(mask, start, gs, 0)),
                             bits, symmetric, mse)
          return spz[0].at[g].set(s), spz[1].at[g].set(z)
        sp, zp = jax.lax.cond((row % gs == 0) & (row < n), fresh, lambda spz: spz, (sp, zp))
      x = w2[i]
      q, deq = _encode(x, sp[g], zp[g], bits, symmetric)
      if m1 is not None:  # a pruned weight ends as 0: all of it is error
        deq = jnp.where(m1[r + i], deq, 0.0)
      err = (x - deq) / u2[i, i]
      w2 = w2 - u2[i][:, None] * err[None, :]  # U is upper triangular: rows before i are untouched
      return w2, e2.at[i].set(err), q2.at[i].set(q), sp, zp, u2

    def sub_block(s, c):
      # `sub` rows one by one (a small working set), then one matmul updates the rest of the block
      w1, e1, q1, sp, zp = c
      r = s * sub
      zeros = jnp.zeros((sub, out), dtype)
      w2, e2, q2, sp, zp, _ = jax.lax.fori_loop(
          0, sub, functools.partial(column, r),
          (jax.lax.dynamic_slice_in_dim(w1, r, sub, 0), zeros, zeros, sp, zp,
           jax.lax.dynamic_slice(u1, (r, r), (sub, sub))))
      w1 = w1 - jax.lax.dynamic_slice_in_dim(u1, r, sub, 0).T @ e2
      w1 = jax.lax.dynamic_update_slice_in_dim(w1, w2, r, 0)
      return (w1, jax.lax.dynamic_update_slice_in_dim(e1, e2, r, 0), jax.lax.dynamic_update_slice_in_dim(q1, q2, r, 0),
              sp, zp)

    zeros = jnp.zeros((block_size, out), dtype)
    _, e1, q1, sp, zp = jax.lax.fori_loop(0, block_size // sub, sub_block, (w1, zeros, zeros, sp, zp))
    u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block_size, 0)  # [block, n]: zero left of the block
    # rows of this block change too, but are done: one GEMM over the window of rows from the block on
    w = inverse_hessian.lazy_update(w, u_rows, e1, i1)
    q_all = jax.lax.dynamic_update_slice_in_dim(q_all, q1.astype(jnp.uint8), i1, 0)  # codes < 256: exact
    return w, q_all, sp, zp

  q_all = jnp.zeros(w.shape, jnp.uint8)
  _, q_all, sp, zp = jax.lax.fori_loop(0, nb, block, (w, q_all, sp, zp))
  codes = q_all[:n]
  if act_order:
    codes = jnp.zeros((n, out), jnp.uint8).at[perm].set(codes)
  return codes, sp, zp


def gptq_from_hessian(w: jax.Array, h: jax.Array, *, bits: int = 4, group_size: int | None = None,
                      act_order: bool = False, symmetric: bool = False, block_size: int = 128,
                      damp: float = 0.01, pack: bool = True, max_damp_tries: int = 6,
                      mask: jax.Array | None = None, static_groups: bool = True, mse: bool = False
                      ) -> core.Quantized:
  """GPTQ of one linear given its input Hessian.

  w: [in, out] float weight; h: [in, in] XᵀX of the layer's inputs (any positive multiple, e.g. the sum from
  `calibration.hessian()`). bits: 2..8; group_size: rows per scale (divides in) or None for per-channel;
  act_order: visit input rows by decreasing diag(H); symmetric: symmetric grid (zero=None in the leaf);
  block_size: rows per lazy-update block; damp: λ = damp · mean(diag H) added to the diagonal. When H + λI is
  not positive definite, λ is multiplied by 10 (up to `max_damp_tries` times) with a warning
  (`calibration.inverse_hessian.inverse_factor`). Dead inputs (H_ii = 0) get H_ii = 1 and their weights zeroed, as in
  the paper's implementation. mask: [in, out] bool, the weights a pruning kept (e.g. `core.Masked.mask`):
  pruned weights count as quantized to 0 and their error is compensated (wrap the result in `core.Masked`).
  static_groups (with act_order and groups): True fixes every group's grid from the unmodified weights in the
  original order before the solver runs (groups stay runs of inputs); False is the authors' default, a group
  being the next group_size rows of the act-order and its grid formed from the weights as updated when the
  solver reaches it (the leaf then holds `g_idx`, each input's group). mse: each group's range from the
  authors' clipping search (`grid_params`) instead of its min and max.
  Raises ValueError for NaN/inf in w or h or a zero h.
  Returns a `core.Quantized` (fmt='int', scale in w's dtype, codes packed when bits divides 8).
  """
  where = 'gptq'
  w = jnp.asarray(w)
  h = jnp.asarray(h)
  mask = _check_mask(mask, w, where)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f'{where}: expected w [in, out] and h [in, in]; got w {w.shape} and h {h.shape}.')
  check_bits(bits, where)
  check_group_size(group_size, w.shape[0], where)
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f'{where}: block_size={block_size!r} must be a positive integer.')
  if not damp > 0:
    raise ValueError(f'{where}: damp={damp!r} must be > 0 (fraction of mean(diag H) added to the diagonal).')
  inverse_hessian.check_finite(w, 'w', where)
  dtype = jnp.promote_types(w.dtype, jnp.float32)
  block_size = min(block_size, w.shape[0])
  factor = inverse_hessian.inverse_factor(h.astype(dtype), damp=float(damp), caller=where, act_order=bool(act_order),
                                  max_tries=max_damp_tries)
  dynamic = bool(act_order) and group_size is not None and not static_groups
  codes, scale, zero = _solve(w, factor.u, factor.dead, factor.perm, mask, bits=int(bits),
                              group_size=group_size, act_order=bool(act_order), symmetric=bool(symmetric),
                              block_size=block_size, static_groups=not dynamic, mse=bool(mse))
  g_idx = jnp.argsort(factor.perm).astype(jnp.int32) // group_size if dynamic else None
  return make_leaf(codes, scale, None if symmetric else zero, bits=int(bits), group_size=group_size,
                   shape=tuple(w.shape), scale_dtype=w.dtype, pack=pack, g_idx=g_idx)


def gptq_from_factor(w: jax.Array, factor: inverse_hessian.Factor, *, bits: int = 4, group_size: int | None = None,
                     symmetric: bool = False, block_size: int = 128, pack: bool = True,
                     mask: jax.Array | None = None, mse: bool = False) -> core.Quantized:
  """GPTQ given the factor of the damped inverse Hessian instead of h, so the linears that share an input (and
  a SparseGPT before it) factor it once: `inverse_hessian.inverse_factor` (act_order=False) or
  `inverse_hessian.inverse_factor_inplace`. w: [in, out] float; factor.u [in, in]. Same result as
  `gptq_from_hessian(w, h, damp=factor.damp)` up to the factor's rounding. mask, mse: as in `gptq_from_hessian`.
  """
  where = 'gptq'
  w = jnp.asarray(w)
  mask = _check_mask(mask, w, where)
  n = w.shape[0] if w.ndim == 2 else -1
  if w.ndim != 2 or tuple(factor.u.shape) != (n, n):
    raise ValueError(f'{where}: expected w [in, out] and factor.u [in, in]; got w {w.shape} and factor.u '
                     f'{tuple(factor.u.shape)}.')
  if not bool(jnp.all(jnp.asarray(factor.perm) == jnp.arange(n))):
    raise ValueError(f'{where}: the factor is in act-order; build it with act_order=False.')
  check_bits(bits, where)
  check_group_size(group_size, n, where)
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f'{where}: block_size={block_size!r} must be a positive integer.')
  inverse_hessian.check_finite(w, 'w', where)
  codes, scale, zero = _solve(w, factor.u, factor.dead, factor.perm, mask, bits=int(bits),
                              group_size=group_size, act_order=False, symmetric=bool(symmetric),
                              block_size=min(block_size, n), mse=bool(mse))
  return make_leaf(codes, scale, None if symmetric else zero, bits=int(bits), group_size=group_size,
                   shape=tuple(w.shape), scale_dtype=w.dtype, pack=pack)


def _check_mask(mask, w, where: str):
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.shape != w.shape:
    raise ValueError(f'{where}: mask has shape {mask.shape}; it must match w {w.shape} (True where a weight is kept).')
  return mask.astype(bool)


def gptq_layer(w: jax.Array, x: jax.Array, *, bits: int = 4, group_size: int | None = None,
               act_order: bool = False, symmetric: bool = False, block_size: int = 128,
               damp: float = 0.01, static_groups: bool = True, mse: bool = False) -> core.Quantized:
  """GPTQ of one linear from calibration inputs. w: [in, out]; x: [tokens, in] (or [..., in]).

  Same arguments as `gptq_from_hessian`; H = XᵀX in float32. Returns a `core.Quantized`.
  """
  x = jnp.asarray(x)
  if x.ndim < 2 or x.shape[-1] != jnp.shape(w)[0]:
    raise ValueError(f'gptq_layer: x has shape {x.shape}; expected [..., {jnp.shape(w)[0]}] (the inputs of w '
                     f'[in, out] = {jnp.shape(w)}).')
  if x.size == 0:
    raise ValueError(f'gptq_layer: x holds no calibration tokens (shape {x.shape}); give at least one row.')
  inverse_hessian.check_finite(x, 'x', 'gptq_layer')
  x = x.reshape(-1, x.shape[-1])
  h = inverse_hessian.xtx(x) if x.dtype != jnp.float64 else x.T @ x
  return gptq_from_hessian(w, h, bits=bits, group_size=group_size, act_order=act_order,
                           symmetric=symmetric, block_size=block_size, damp=damp, static_groups=static_groups,
                           mse=mse)


def layer_error(x: jax.Array, w: jax.Array, w_hat) -> float:
  """‖X W − X Ŵ‖_F / ‖X W‖_F for x [tokens, in], w [in, out], Ŵ dense or compressed."""
  y = x @ w
  return float(jnp.linalg.norm(y - x @ core.materialize(w_hat).astype(y.dtype)) / jnp.linalg.norm(y))


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8)
  # rows per scale (divides every kernel's input dimension), None: per channel
  group_size: int | None = registry.field(128, range='[1, inf)')
  act_order: bool = False  # visit input rows by decreasing diag(H)
  # with act_order and groups: True fixes the grids beforehand in the original order (groups of consecutive
  # inputs); False forms each group from the next group_size rows of the act-order (the authors' default; the
  # leaf holds g_idx, which the GPTQ layout exports and compressed-tensors cannot hold)
  static_groups: bool = True
  symmetric: bool = False  # symmetric grid instead of the authors' asymmetric min-max one
  mse: bool = False  # each group's range from the authors' clipping search (least |Q(w) − w|^2.4), not min-max
  block_size: int = 128  # rows per lazy-update block
  damp: float = 0.01  # fraction of mean(diag H) added to H's diagonal
  rules: core.Rules = core.Rules()  # which block linears are quantized (recipe: include=, exclude=)

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'gptq')


def gptq(model, params, calib, *, config: GPTQConfig = GPTQConfig(), offload: bool = False, mesh=None):
  """GPTQ of every block linear `config.rules` choose (default: all), true-sequentially: each group of `model.block_structure()` (q/k/v, o, gate/up,
  down) is calibrated on the block as quantized so far (`calibration.run_sequential(..., per_group=True)`).

  Mixture-of-experts weights ('mlp/up', 'mlp/gate', 'mlp/down' [E, in, out]) are quantized expert by expert,
  each from the Hessian of the tokens routed to it (`calibration.solve_experts`, spread over `mesh`'s devices);
  an expert no calibration token reached is rounded to nearest (identity Hessian). The router stays float.
  calib: a `registry.Context` or a list of calibration batches (token arrays [B, T] or mappings with 'tokens'
  and 'attention_mask', as `calibration.run_sequential` takes them); offload: keep the hidden states on the
  host between blocks; mesh: run_sequential's data-parallel mesh, also used for the expert solves. Returns
  (model, params with `core.Quantized` kernels): `core.Masked(core.Quantized)` where a kernel was `Masked` (its
  kept values quantized, its mask kept); stacked [E, in, out] leaves for experts.
  """
  batches = registry.as_context(calib).batches()
  solve = functools.partial(gptq_from_hessian, bits=config.bits, group_size=config.group_size,
                            act_order=config.act_order, symmetric=config.symmetric, block_size=config.block_size,
                            static_groups=config.static_groups, mse=config.mse,
                            damp=config.damp)

  def one(w, st):
    # a pruned kernel (Masked): its kept weights quantized, the pruned ones counted as 0 and compensated
    mask = w.mask if isinstance(w, core.Masked) else None
    dense = w.materialize() if mask is not None else w
    if len(core.shape_of(w)) == 3:  # stacked experts
      h = calibration.experts.unseen_identity(st['xtx'], st['count'])
      q = (calibration.solve_experts(solve, dense, h, mesh=mesh) if mask is None else
           calibration.solve_experts(lambda we, he, me: solve(we, he, mask=me), dense, h, mask, mesh=mesh))
    else:
      q = solve(dense, st['xtx'], mask=mask)
    return q if mask is None else core.Masked(q, mask)

  def compress_block(i, block, stats):
    del i
    return core.paths.replace(block, {p: one(core.paths.get(block, p), st) for p, st in stats.items()})

  compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                    caller='gptq')
  params, _ = calibration.run_sequential(model, params, batches, calibration.hessian(), compress_block,
                                         per_group=True, keep_stats=False, offload=offload, mesh=mesh, experts=True)
  return model, params


registry.register('gptq', GPTQConfig, gptq, family='quantization',
                  forbids=common.DENSE_OR_MASKED, adds='quantized', calibrated=True,
                  check=common.check_block_group_size,
                  paper='Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained '
                  'Transformers" (ICLR 2023)')
