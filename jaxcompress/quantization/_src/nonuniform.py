"""Non-uniform quantization in the manner of SqueezeLLM (Kim et al., ICML 2024).

Each output column of w [in, out] gets its own 2^bits levels from a sensitivity-weighted k-means over its
entries: minimise Σ_i s_i (w_i − c[q_i])². SqueezeLLM's sensitivity is the Fisher information diagonal; here it
is the calibration inputs' second moment diag(XᵀX) (the diagonal of GPTQ's Hessian, what `calibration.hessian()`
streams), so an entry matters in proportion to how strongly its input fires. The result is a `core.Quantized`
with fmt='codebook' and a per-column codebook [out, 2^bits].

Dense-and-sparse: the `outlier_fraction` largest |w| entries are kept exactly in float in an `Outliers(base,
index, values)` leaf (W = base with those entries replaced); k-means runs on the rest (the outliers get weight
zero), so they do not stretch the levels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import calibration, core, registry
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import quantized as qlib
from jaxcompress.core import serialize
from jaxcompress.quantization._src import common


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Outliers(core.Compressed):
  """W = base with the entries at flat positions `index` replaced by `values`.

  base: [in, out] weight (e.g. a codebook `Quantized`); index: [k] int32 flat positions (row * out + col);
  values: [k] float, the exact weights there.
  """

  base: Any
  index: Any
  values: Any

  @property
  def shape(self):
    return core.shape_of(self.base)

  @property
  def dtype(self):
    return core.dtype_of(self.base)

  def materialize(self):
    w = core.materialize(self.base)
    return w.reshape(-1).at[self.index].set(self.values.astype(w.dtype)).reshape(w.shape)

  def matmul(self, x):
    out = self.shape[1]
    rows, cols = self.index // out, self.index % out
    base_vals = core.materialize(self.base).reshape(-1)[self.index]  # k entries only
    delta = (self.values.astype(jnp.float32) - base_vals.astype(jnp.float32)).astype(x.dtype)
    y = core.linear(x, self.base)
    return y.at[..., cols].add(x[..., rows] * delta)

  def stored_params(self):
    return core.stored_params(self.base) + 2 * int(np.size(self.values))

  def memory_bytes(self):
    return core.memory_bytes(self.base) + core.memory_bytes(self.index) + core.memory_bytes(self.values)

  def disk_bytes(self):
    return core.disk_bytes(self.base) + core.memory_bytes(self.index) + core.memory_bytes(self.values)

  def matmul_flops(self):
    return core.matmul_flops(self.base) + 2 * int(np.size(self.values))


def _encode(w: Outliers, out: serialize.Writer) -> dict:
  out.put('.index', w.index)
  out.put('.values', w.values)
  return {'base': out.weight('.base', w.base)}


def _decode(desc: dict, src: serialize.Reader) -> Outliers:
  return Outliers(src.weight('.base', desc['base']), jnp.asarray(src.get('.index')),
                  jnp.asarray(src.get('.values')))


serialize.register('outliers', Outliers, _encode, _decode)


@functools.partial(jax.jit, static_argnames=('levels', 'iters'))
def weighted_kmeans(v: jax.Array, s: jax.Array, *, levels: int, iters: int) -> tuple[jax.Array, jax.Array]:
  """1-D weighted k-means of one column. v, s: [n] values and weights -> (centroids [levels], codes [n] int32).

  Initial centroids: evenly spaced between min and max of the weighted entries; `iters` Lloyd steps; an empty
  cluster keeps its centroid.
  """
  live = s > 0
  lo = jnp.min(jnp.where(live, v, jnp.inf))
  hi = jnp.max(jnp.where(live, v, -jnp.inf))
  lo, hi = jnp.where(jnp.isfinite(lo), lo, 0.0), jnp.where(jnp.isfinite(hi), hi, 0.0)
  c0 = lo + (hi - lo) * jnp.arange(levels, dtype=v.dtype) / max(levels - 1, 1)

  def assign(c):
    return jnp.argmin(jnp.abs(v[:, None] - c[None, :]), axis=1)

  def step(c, _):
    onehot = jax.nn.one_hot(assign(c), levels, dtype=v.dtype) * s[:, None]
    mass = onehot.sum(0)
    return jnp.where(mass > 0, (onehot * v[:, None]).sum(0) / jnp.where(mass > 0, mass, 1.0), c), None

  c, _ = jax.lax.scan(step, c0, None, length=iters)
  return c, assign(c)


def squeezellm_from_hessian(w: jax.Array, h_diag: jax.Array, *, bits: int = 3, outlier_fraction: float = 0.0,
                            iters: int = 20, pack: bool = True):
  """Sensitivity-weighted k-means per output column. w: [in, out]; h_diag: [in] sensitivity (diag of XᵀX).

  Returns a codebook `core.Quantized` ([out, 2^bits] levels), wrapped in `Outliers` when outlier_fraction > 0.
  """
  where = 'squeezellm'
  w = jnp.asarray(w)
  if w.ndim != 2 or jnp.shape(h_diag) != (w.shape[0],):
    raise ValueError(f'{where}: expected w [in, out] and h_diag [in]; got {w.shape} and {jnp.shape(h_diag)}.')
  common.check_bits(bits, where)
  if not 0 <= outlier_fraction < 1:
    raise ValueError(f'{where}: outlier_fraction={outlier_fraction!r} must be in [0, 1).')
  common.check_finite(w, 'w', where)
  common.check_finite(h_diag, 'the sensitivity (calibration inputs)', where)
  dt = jnp.promote_types(w.dtype, jnp.float32)
  wf = w.astype(dt)
  sens = jnp.broadcast_to(jnp.maximum(jnp.asarray(h_diag, dt), 0.0)[:, None], w.shape)
  sens = sens + (jnp.max(sens) * 1e-8 + 1e-30)  # inputs that never fire still get a level near them
  k = int(round(outlier_fraction * w.size))
  index = None
  if k:
    index = jnp.argsort(-jnp.abs(wf).reshape(-1))[:k].astype(jnp.int32)
    sens = sens.reshape(-1).at[index].set(0.0).reshape(w.shape)
  book, codes = jax.vmap(lambda v, s: weighted_kmeans(v, s, levels=2 ** bits, iters=iters), in_axes=(1, 1))(wf, sens)
  codes = codes.T.astype(jnp.uint8)  # [in, out]
  packed = bool(pack and qlib.packs(bits) and w.shape[0] % (8 // bits) == 0)
  leaf = core.Quantized(codes=qlib.pack_codes(codes, bits) if packed else codes, scale=None,
                        codebook=book.astype(w.dtype), bits=int(bits), group_size=None, fmt='codebook',
                        packed=packed, logical_shape=tuple(w.shape))
  if not k:
    return leaf
  return Outliers(leaf, index, wf.reshape(-1)[index].astype(w.dtype))


def squeezellm_layer(w: jax.Array, x: jax.Array, **kwargs):
  """`squeezellm_from_hessian` with the sensitivity Σ_t x[t, i]² of calibration inputs x [tokens, in]."""
  x = jnp.asarray(x)
  common.check_finite(x, 'x', 'squeezellm_layer')
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return squeezellm_from_hessian(w, jnp.sum(x * x, axis=0), **kwargs)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class NonUniformConfig:
  bits: int = registry.field(3, range='[2, 8]')  # codebook entries 2^bits per output column
  # fraction of weights kept in float (dense-and-sparse)
  outlier_fraction: float = registry.field(0.0, range='[0.0, 1.0)')
  iters: int = registry.field(20, range='[1, inf)')  # weighted k-means iterations
  rules: core.Rules = core.Rules()  # which block linears are quantized (recipe: include=, exclude=)

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'nonuniform')


def nonuniform(model, params, calib, *, config: NonUniformConfig = NonUniformConfig()):
  """Every block linear `config.rules` choose (default: all) as a per-column codebook (`squeezellm_from_hessian`), sensitivities Σ x² from the
  full-precision model's calibration inputs (`calibration.column_norms()` through `run_sequential` with
  calibrate_on='original': one block's statistics at a time, so it also runs out of core). calib: a
  `registry.Context` or a list of calibration batches. Returns (model, the new params)."""
  batches = registry.as_context(calib).batches()

  def compress_block(i, block, stats):
    return core.paths.replace(block, {
        k: squeezellm_from_hessian(core.paths.get(block, k), st['sq_norm'], bits=config.bits,
                                   outlier_fraction=config.outlier_fraction, iters=config.iters)
        for k, st in stats.items()})

  compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                    caller='nonuniform')
  params, _ = calibration.run_sequential(model, params, batches, calibration.column_norms(), compress_block,
                                         calibrate_on='original', keep_stats=False)
  return model, params


registry.register('nonuniform', NonUniformConfig, nonuniform, family='quantization', forbids=registry.COMPRESSED,
                  adds='quantized', calibrated=True, check=common.check_rules,
                  paper='Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization" (ICML 2024)')
