"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023): OBS mask selection with reconstruction of the kept weights, one input row at a time.

With W: [in, out] (the paper's Wᵀ), H = XᵀX + λI over the inputs and U upper triangular with UᵀU = H⁻¹, row j
is pruned against the rows after it:

    select (per block of `block_size` rows): prune the smallest  W[j, o]² / U[j, j]²      (adaptive mask)
    err = (W[j] - Q[j]) / U[j, j];   W[j:] -= U[j, j:]ᵀ err            (Q[j]: W[j] with pruned entries 0)

Updates of the rows after the block are lazy (once per block, `inverse_hessian.lazy_update`). N:M selects per
group of M input rows as the group is reached. The loops over blocks and rows are `lax.fori_loop`s over
`dynamic_slice`s, so a layer shape compiles once, whatever its width. The model-level method `sparsegpt` prunes
true-sequentially:

    model, params = pruning.sparsegpt(model, params, batches, config=pruning.SparseGPTConfig(pattern='2:4'))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxcompress import calibration, core, registry
from jaxcompress.calibration import inverse_hessian
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src import masks as masks_lib
from jaxcompress.pruning._src.inputs import check_calibration, check_kernel
from jaxcompress.pruning._src.oneshot import Distribution, check_distribution, check_kernels, sequential

HIGHEST = lax.Precision.HIGHEST


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPTConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # fraction pruned, adaptively per block of rows
  pattern: str | None = None  # None (unstructured) or 'N:M' such as '2:4' (prunes 1 - N/M instead of sparsity)
  block_size: int = 128  # input rows per adaptive-mask block and per lazy update
  damp: float = 0.01  # λ = damp · mean(diag XᵀX) added to the Hessian's diagonal
  rules: core.Rules = core.Rules()  # which block kernels are pruned (recipe: include=, exclude=, embeddings=, head=)
  per_group: bool = True  # true-sequential: later groups of a block see the earlier groups already pruned
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs for some kernels
  distribution: Distribution = 'uniform'  # per-layer sparsity: 'uniform', 'erk', 'owl' or a callable (oneshot.py)
  outlier_threshold: float = registry.field(5.0, range='(0.0, inf)')  # OWL's M: outlier = score > M × block mean
  owl_lambda: float = registry.field(0.08, range='[0.0, 0.25]')  # OWL's λ: block sparsities within sparsity ± 2λ

  def __post_init__(self):
    if masks_lib.parse_pattern(self.pattern, caller='') == 'per_output':
      raise ValueError("pattern='per_output' is not a SparseGPT selection; use None (adaptive per block) or 'N:M'.")
    check_distribution(self)


def kth_smallest_nonnegative(x: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th smallest (0-based) of x [n] float32 ≥ 0 (inf allowed), exactly: a bisection over the float bits,
  which order like int32 for non-negative floats. 31 counting passes instead of a sort."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)

  def step(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid) >= k + 1
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = lax.fori_loop(0, 31, step, (jnp.int32(0), jnp.int32(0x7F800000)))
  return lax.bitcast_convert_type(lo, jnp.float32)


@functools.partial(jax.jit, static_argnames=('nm', 'block_size'))
def _solve(w: jax.Array, u: jax.Array, dead: jax.Array, sparsity: jax.Array, *, nm: tuple[int, int] | None,
           block_size: int) -> tuple[jax.Array, jax.Array]:
  """(reconstructed w [in, out] float32 with pruned entries 0, kept mask [in, out] bool) from the upper factor u
  [in, in] of the damped H⁻¹ and the dead inputs [in] (their rows are zeroed: they never reach the output)."""
  n_in, n_out = w.shape
  w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))
  u = u.astype(jnp.float32)
  bs = block_size
  n_blocks = -(-n_in // bs)
  pad = n_blocks * bs - n_in
  # Padding rows: zero weights and an identity block of U, so they neither change nor are changed by real rows.
  if pad:  # (without padding, no [in, in] copy of u: the widest layers' factor is hundreds of MiB)
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n_in + pad) >= n_in).astype(u.dtype)
  kept = jnp.ones(w.shape, bool)

  sub = inverse_hessian.sub_block_size(bs, nm[1] if nm else 1)

  def row(i, carry):
    w2, e2, pruned, u2 = carry
    wi = w2[i]
    q = jnp.where(pruned[i], 0.0, wi)
    err = (wi - q) / u2[i, i]
    w2 = w2 - u2[i][:, None] * err[None, :]  # U is upper triangular: rows before i are untouched
    return w2.at[i].set(q), e2.at[i].set(err), pruned, u2

  def rows(w2, pruned, u2):
    """Rows of one sub-block in order; N:M selects each group of M rows from their values when reached."""
    e2 = jnp.zeros_like(w2)
    if nm is None:
      return lax.fori_loop(0, sub, row, (w2, e2, pruned, u2))[:3]
    n, m = nm
    d = jnp.diagonal(u2)

    def group(g, carry):
      w2, e2, pruned, u2 = carry
      wg = lax.dynamic_slice(w2, (g * m, 0), (m, n_out))
      dg = lax.dynamic_slice(d, (g * m,), (m,))
      sel = masks_lib.nm_mask(jnp.square(wg) / jnp.square(dg)[:, None], n, m)
      pruned = lax.dynamic_update_slice(pruned, ~sel, (g * m, 0))
      return lax.fori_loop(g * m, g * m + m, row, (w2, e2, pruned, u2))

    return lax.fori_loop(0, sub // m, group, (w2, e2, pruned, u2))[:3]

  def sub_block(s, carry):
    # Rows are solved `sub` at a time (small enough to stay in cache); the rest of the block is updated lazily.
    w1, e1, pruned, u1 = carry
    r = s * sub
    w2, e2, p2 = rows(lax.dynamic_slice(w1, (r, 0), (sub, n_out)), lax.dynamic_slice(pruned, (r, 0), (sub, n_out)),
                      lax.dynamic_slice(u1, (r, r), (sub, sub)))
    w1 = w1 - jnp.matmul(lax.dynamic_slice(u1, (r, 0), (sub, bs)).T, e2, precision=HIGHEST)
    w1 = lax.dynamic_update_slice(w1, w2, (r, 0))
    return (w1, lax.dynamic_update_slice(e1, e2, (r, 0)), lax.dynamic_update_slice(pruned, p2, (r, 0)), u1)

  def block(b, carry):
    w, kept = carry
    i1 = b * bs
    w1 = lax.dynamic_slice(w, (i1, 0), (bs, n_out))
    u_rows = lax.dynamic_slice(u, (i1, 0), (bs, n_in + pad))
    u1 = lax.dynamic_slice(u_rows, (0, i1), (bs, bs))
    if nm is None:  # adaptive selection over the whole block, from its values when the block is reached
      d = jnp.diagonal(u1)
      valid = (i1 + jnp.arange(bs)) < n_in
      score = jnp.where(valid[:, None], jnp.square(w1) / jnp.square(d)[:, None], jnp.inf).reshape(-1)
      k = jnp.round(sparsity * jnp.sum(valid) * n_out).astype(jnp.int32)
      thresh = kth_smallest_nonnegative(score, jnp.minimum(k, score.size - 1))
      pruned = (score < thresh).reshape(bs, n_out)
    else:
      pruned = jnp.zeros(w1.shape, bool)
    w1, e1, pruned, _ = lax.fori_loop(0, bs // sub, sub_block, (w1, jnp.zeros_like(w1), pruned, u1))
    # Lazy update of the rows after the block (one GEMM over a window that starts at or before the block); the
    # block's own rows are overwritten just after.
    w = inverse_hessian.lazy_update(w, u_rows, e1, i1)
    w = lax.dynamic_update_slice(w, w1, (i1, 0))
    return w, lax.dynamic_update_slice(kept, ~pruned, (i1, 0))

  w, kept = lax.fori_loop(0, n_blocks, block, (w, kept))
  return w[:n_in], kept[:n_in]


def sparsegpt_from_hessian(w: jax.Array, h: jax.Array, *, sparsity: float = 0.5, pattern: str | None = None,
                           block_size: int = 128, damp: float = 0.01) -> core.Masked:
  """SparseGPT from streamed statistics: w [in, out] float, h = XᵀX [in, in] (any positive scale, e.g.
  `calibration.hessian()`'s 'xtx').

  sparsity: fraction pruned in [0, 1) (unstructured; selected adaptively per block of `block_size` rows).
  pattern: None / 'unstructured', or 'N:M' (e.g. '2:4': at most N kept of every M inputs of each output).
  damp: λ = damp · mean(diag H) added to H's diagonal, multiplied by 10 (with a warning) while H + λI is not
    positive definite in float32 (`calibration.inverse_hessian.inverse_factor`). Dead inputs (H[j, j] = 0: never
    active) get H[j, j] = 1 and their weights zeroed, as in the paper's implementation.
  Raises ValueError for NaN/inf in w or h, a zero h, or bad arguments.
  Returns core.Masked(value=reconstructed w in w's dtype, mask [in, out] bool).
  """
  check_kernel(w, caller='sparsegpt')
  h = jnp.asarray(h)
  n_in = w.shape[0]
  if h.shape != (n_in, n_in):
    raise ValueError(f'sparsegpt: h has shape {h.shape}, expected ({n_in}, {n_in}) = XᵀX over the inputs of '
                     f'w [in, out] = {w.shape}.')
  inverse_hessian.check_finite(w, 'w', 'sparsegpt')
  if not damp > 0:
    raise ValueError(f'sparsegpt: damp={damp!r} must be > 0 (fraction of mean(diag H) added to the diagonal; '
                     'the paper uses 0.01).')
  if not (isinstance(block_size, int) and block_size > 0):
    raise ValueError(f'sparsegpt: block_size={block_size!r} must be a positive int (e.g. 128).')
  p = masks_lib.parse_pattern(pattern, caller='sparsegpt')
  if p == 'per_output':
    raise ValueError("sparsegpt: pattern='per_output' is not a SparseGPT selection; use None (adaptive per "
                     "block) or 'N:M'.")
  nm = p if isinstance(p, tuple) else None
  if nm is not None:
    masks_lib.check_nm(n_in, nm, caller='sparsegpt')
    block_size = -(-block_size // nm[1]) * nm[1]  # whole groups per block
    sparsity = 1 - nm[0] / nm[1]
  else:
    sparsity = masks_lib.check_sparsity(sparsity, caller='sparsegpt')
  block_size = min(block_size, -(-n_in // (nm[1] if nm else 1)) * (nm[1] if nm else 1))
  factor = inverse_hessian.inverse_factor(h.astype(jnp.float32), damp=damp, caller='sparsegpt')
  value, kept = _solve(w, factor.u, factor.dead, jnp.float32(sparsity), nm=nm, block_size=block_size)
  return core.Masked(value=value.astype(w.dtype), mask=kept)


def sparsegpt_from_factor(w: jax.Array, factor: inverse_hessian.Factor, *, sparsity: float = 0.5,
                          block_size: int = 128) -> core.Masked:
  """Unstructured SparseGPT given the factor of the damped inverse Hessian instead of h, so the linears that
  share an input (q/k/v, gate/up), and a GPTQ of the result, factor it once: `inverse_hessian.inverse_factor`
  (act_order=False) or, for the widest layers on a small host, `inverse_hessian.inverse_factor_inplace`.

  w: [in, out] float; factor.u [in, in]. Same result as `sparsegpt_from_hessian(w, h, damp=factor.damp)` up to
  the factor's rounding. Returns core.Masked(value in w's dtype, mask [in, out] bool).
  """
  check_kernel(w, caller='sparsegpt')
  n_in = w.shape[0]
  if tuple(factor.u.shape) != (n_in, n_in):
    raise ValueError(f'sparsegpt: factor.u has shape {tuple(factor.u.shape)}, expected ({n_in}, {n_in}) for w '
                     f'[in, out] = {w.shape}.')
  if not bool(jnp.all(jnp.asarray(factor.perm) == jnp.arange(n_in))):
    raise ValueError('sparsegpt: the factor is in act-order (a permuted input order); build it with '
                     'act_order=False.')
  inverse_hessian.check_finite(w, 'w', 'sparsegpt')
  if not (isinstance(block_size, int) and block_size > 0):
    raise ValueError(f'sparsegpt: block_size={block_size!r} must be a positive int (e.g. 128).')
  sparsity = masks_lib.check_sparsity(sparsity, caller='sparsegpt')
  value, kept = _solve(w, factor.u, factor.dead, jnp.float32(sparsity), nm=None, block_size=min(block_size, n_in))
  return core.Masked(value=value.astype(w.dtype), mask=kept)


def sparsegpt_layer(w: jax.Array, x: jax.Array, *, sparsity: float = 0.5, pattern: str | None = None,
                    block_size: int = 128, damp: float = 0.01) -> core.Masked:
  """SparseGPT on one linear layer: w [in, out] float, x [tokens, in] its calibration inputs.

  See `sparsegpt_from_hessian` for the arguments; H = XᵀX is formed here in float32.
  """
  x = check_calibration(x, w, caller='sparsegpt_layer')
  return sparsegpt_from_hessian(w, inverse_hessian.xtx(x), sparsity=sparsity, pattern=pattern,
                                block_size=block_size, damp=damp)


def sparsegpt(model: Model, params: Params, calib, *, config: SparseGPTConfig = SparseGPTConfig(),
              **driver_kwargs) -> tuple[Model, Params]:
  """SparseGPT on every selected block kernel, true-sequentially (see `SparseGPTConfig.per_group`).

  calib: a `registry.Context` or a list of calibration batches (token arrays [B, T] or mappings with 'tokens'
  and 'attention_mask'). driver_kwargs: more options of `calibration.run_sequential` (offload, on_step, ...)
  besides the context's mesh.
  """
  ctx = registry.as_context(calib)

  def solve(w, xtx, sparsity):
    return sparsegpt_from_hessian(w, xtx, sparsity=sparsity, pattern=config.pattern,
                                  block_size=config.block_size, damp=config.damp)

  def statistic(stats, experts):
    # an expert no calibration token reached: white inputs (magnitude pruning)
    return calibration.experts.unseen_identity(stats['xtx'], stats['count']) if experts else stats['xtx']

  pruned = sequential(model, params, ctx.batches(split=True), calibration.hessian(), solve, statistic, config,
                      {**ctx.driver_kwargs(), **driver_kwargs})
  return model, registry.local(pruned)


registry.register('sparsegpt', SparseGPTConfig, sparsegpt, family='pruning', forbids=registry.COMPRESSED,
                  adds='masked', calibrated=True, check=check_kernels,
                  paper='Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" '
                  '(ICML 2023)')
