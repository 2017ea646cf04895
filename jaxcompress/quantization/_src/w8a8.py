"""W8A8: int8 weights and per-token int8 activations multiplied as int8 × int8 → int32.

`Int8Linear` is a leaf kind of this family (registered with `core.serialize.register`), so `core.linear`
dispatches to its `matmul` without core knowing it:

    x' = x · inv_smooth                         (SmoothQuant's migration, when not folded into a norm)
    sx[t] = max_j |x'[t, j]| / 127              per token, computed on the fly (dynamic)
    y = (round(x' / sx) ⊗int32 codes) · sx · scale  + x[:, outliers] @ outlier_weight

Weights: symmetric per output channel, scale = max_i |w[i, o]| / 127. SmoothQuant (Xiao et al., ICML 2023)
migrates activation outliers into the weights with s_j = max|x_j|^α / max|w_j|^(1-α): W ← diag(s) W,
x ← x / s. LLM.int8() (Dettmers et al., NeurIPS 2022) keeps the input features whose calibration |x| exceeds a
threshold in float (their weight rows are zeroed in the int8 part), the rest in int8.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import calibration, core, registry
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize
from jaxcompress.quantization._src import common

QMAX = 127


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Int8Linear(core.Compressed):
  """An activation-quantized linear.

  codes: [in, out] int8 weight codes; scale: [out] float per-output-channel weight scale (the leaf's dtype);
  inv_smooth: [in] float multiplied into x before quantization, or None; outliers: [k] int32 input features kept
  in float, or None; outlier_weight: [k, out] float weight rows of those features, or None.
  """

  codes: jax.Array
  scale: jax.Array
  inv_smooth: Any = None
  outliers: Any = None
  outlier_weight: Any = None

  @property
  def shape(self):
    return tuple(self.codes.shape)

  @property
  def dtype(self):
    return np.dtype(self.scale.dtype)

  def materialize(self):
    """The weight the int8 path approximates (activation rounding aside): [in, out]."""
    w = self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)
    if self.outliers is not None:
      w = w.at[self.outliers].set(self.outlier_weight.astype(jnp.float32))
    if self.inv_smooth is not None:
      w = w * self.inv_smooth.astype(jnp.float32)[:, None]
    return w.astype(self.dtype)

  def matmul(self, x):
    xs = x.astype(jnp.float32)
    if self.inv_smooth is not None:
      xs = xs * self.inv_smooth.astype(jnp.float32)
    y = 0.0
    if self.outliers is not None:
      y = xs[..., self.outliers] @ self.outlier_weight.astype(jnp.float32)
      xs = xs.at[..., self.outliers].set(0.0)
    xq, sx = quantize_tokens(xs)
    acc = jax.lax.dot_general(xq, self.codes, (((xq.ndim - 1,), (0,)), ((), ())),
                              preferred_element_type=jnp.int32)
    y = y + acc.astype(jnp.float32) * sx * self.scale.astype(jnp.float32)
    return y.astype(x.dtype)

  def stored_params(self):
    return self.size + sum(int(np.size(a)) for a in (self.scale, self.inv_smooth, self.outlier_weight)
                           if a is not None)

  def memory_bytes(self):
    return sum(leaf_lib.memory_bytes(a) for a in (self.codes, self.scale, self.inv_smooth, self.outliers,
                                                   self.outlier_weight) if a is not None)

  def disk_bytes(self):
    return self.memory_bytes()

  def matmul_flops(self):
    return 2 * self.size


_FIELDS = ('codes', 'scale', 'inv_smooth', 'outliers', 'outlier_weight')


def _encode(w: Int8Linear, out: serialize.Writer) -> dict:
  fields = [f for f in _FIELDS if getattr(w, f) is not None]
  for f in fields:
    out.put(f'.{f}', getattr(w, f))
  return {'fields': fields}


def _decode(desc: dict, src: serialize.Reader) -> Int8Linear:
  return Int8Linear(**{f: (jnp.asarray(src.get(f'.{f}')) if f in desc['fields'] else None) for f in _FIELDS})


serialize.register('int8_linear', Int8Linear, _encode, _decode)


def quantize_tokens(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token symmetric int8: x [..., in] float -> (codes [..., in] int8, scale [..., 1] float32).

  An all-zero token gets scale 1 (codes 0), never a division by zero.
  """
  sx = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / QMAX
  sx = jnp.where(sx == 0, 1.0, sx)
  return jnp.clip(jnp.round(x / sx), -QMAX, QMAX).astype(jnp.int8), sx


def quantize_channels(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel symmetric int8: w [in, out] -> (codes [in, out] int8, scale [out])."""
  scale = jnp.max(jnp.abs(w), axis=0) / QMAX
  scale = jnp.where(scale == 0, 1.0, scale)
  return jnp.clip(jnp.round(w / scale), -QMAX, QMAX).astype(jnp.int8), scale


def smooth_scales(x_absmax: jax.Array, w: jax.Array, alpha: float = 0.5) -> jax.Array:
  """SmoothQuant's s_j = max|x_j|^α / max_o |w[j, o]|^(1-α), [in]; channels that are zero on either side get 1."""
  wmax = jnp.max(jnp.abs(w), axis=1)
  s = jnp.power(x_absmax, alpha) / jnp.power(wmax, 1 - alpha)
  return jnp.where((x_absmax > 0) & (wmax > 0) & jnp.isfinite(s), s, 1.0)


def w8a8_layer(w: jax.Array, *, x_absmax: jax.Array | None = None, alpha: float | None = None,
               outlier_threshold: float | None = None, fold: bool = False) -> Int8Linear:
  """An `Int8Linear` of w [in, out].

  Naive W8A8: no other argument. SmoothQuant: x_absmax [in] (calibration max |x|) and alpha (migration strength);
  the 1/s pre-scale is stored in the leaf unless fold=True (the caller divides the preceding norm by s).
  LLM.int8(): x_absmax and outlier_threshold: features with max |x| > threshold stay in float.
  """
  where = 'w8a8_layer'
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f'{where}: expected w [in, out], got shape {w.shape}.')
  common.check_finite(w, 'w', where)
  if (alpha is not None or outlier_threshold is not None) and x_absmax is None:
    raise ValueError(f'{where}: alpha / outlier_threshold need x_absmax [in] (calibration.abs_max()).')
  if x_absmax is not None:
    x_absmax = jnp.asarray(x_absmax, jnp.float32)
    if x_absmax.shape != (w.shape[0],):
      raise ValueError(f'{where}: x_absmax has shape {x_absmax.shape}; expected [{w.shape[0]}].')
    common.check_finite(x_absmax, 'x_absmax (calibration data)', where)
  if alpha is not None and not 0 <= alpha <= 1:
    raise ValueError(f'{where}: alpha={alpha!r} must be in [0, 1].')
  wf = w.astype(jnp.float32)
  inv = None
  if alpha is not None:
    s = smooth_scales(x_absmax, wf, alpha)
    wf = wf * s[:, None]
    inv = None if fold else (1.0 / s).astype(w.dtype)
  outliers = outlier_weight = None
  if outlier_threshold is not None:
    idx = np.flatnonzero(np.asarray(x_absmax) > outlier_threshold).astype(np.int32)
    if idx.size:
      outliers, outlier_weight = jnp.asarray(idx), wf[idx].astype(w.dtype)
      wf = wf.at[idx].set(0.0)
  codes, scale = quantize_channels(wf)
  return Int8Linear(codes=codes, scale=scale.astype(w.dtype), inv_smooth=inv, outliers=outliers,
                    outlier_weight=outlier_weight)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class W8A8Config:
  migration: float | None = 0.5  # SmoothQuant's migration strength α; None: naive W8A8
  outlier_threshold: float | None = None  # LLM.int8(): features with calibration max |x| above it stay float
  # which block linears are quantized (recipe: include=, exclude=); a group chosen in part keeps its smoothing in
  # the leaves, since folding it into the norm would change the kernels left float
  rules: core.Rules = core.Rules()

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'w8a8')


def w8a8(model, params, calib, *, config: W8A8Config = W8A8Config()):
  """Every block linear `config.rules` choose (default: all) as an `Int8Linear`. With a migration strength, the
  smoothing of a group fed by a norm
  (`model.linear_groups`) is folded into that norm's scale (and bias); other groups keep it in the leaf.
  Statistics (max |x| per input feature) are those of the full-precision model: `calibration.run_sequential`
  with calibrate_on='original' (the same as `calibrate`'s, one block's at a time), so it also runs out of core.
  calib: a `registry.Context` or a list of calibration batches. Returns (model, params). Registered as w8a8
  (migration=None), smoothquant (migration=0.5) and llm_int8 (migration=None, outlier_threshold=6.0).
  """
  batches = registry.as_context(calib).batches()

  def compress_block(i, block, stats):
    return _w8a8_block(model, block, stats, config)

  compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                    caller='w8a8')
  params, _ = calibration.run_sequential(model, params, batches, calibration.abs_max(), compress_block,
                                         calibrate_on='original', keep_stats=False)
  return model, params


def _w8a8_block(model, block, stats, config: W8A8Config):
  """The block's linears in `stats` as `Int8Linear`s. stats: {kernel path within the block: `abs_max()`
  statistics}."""
  updates = {}
  for group in model.block_structure(block):
    kernels = [k for k in group.kernels if k in stats]
    if not kernels:
      continue
    amax = stats[kernels[0]]['abs_max']  # the kernels of a group share their input
    ws = [jnp.asarray(core.paths.get(block, k)) for k in kernels]
    fold = group.norm is not None and config.migration is not None and len(kernels) == len(group.kernels)
    if fold:  # one s for the group: its kernels share the norm
      s = smooth_scales(amax, jnp.concatenate(ws, axis=1).astype(jnp.float32), config.migration)
      for name in ('scale', 'bias'):
        p = f'{group.norm}/{name}'
        v = core.paths.flatten(block).get(p)
        if v is not None:
          updates[p] = (jnp.asarray(v, jnp.float32) / s).astype(jnp.asarray(v).dtype)
      ws = [(w.astype(jnp.float32) * s[:, None]).astype(w.dtype) for w in ws]
      amax = amax / s
    for k, w in zip(kernels, ws):
      updates[k] = w8a8_layer(w, x_absmax=amax, alpha=None if fold else config.migration,
                              outlier_threshold=config.outlier_threshold)
  return core.paths.replace(block, updates)


registry.register('w8a8', W8A8Config, w8a8, family='quantization', forbids=registry.COMPRESSED, adds='quantized',
                  calibrated=True, check=common.check_rules, defaults={'migration': None},
                  paper='int8 weights per channel, int8 activations per token')
registry.register('smoothquant', W8A8Config, w8a8, family='quantization', forbids=registry.COMPRESSED,
                  adds='quantized', calibrated=True, check=common.check_rules, defaults={'migration': 0.5},
                  paper='Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for LLMs" '
                  '(ICML 2023)')
registry.register('llm_int8', W8A8Config, w8a8, family='quantization', forbids=registry.COMPRESSED,
                  adds='quantized', calibrated=True, check=common.check_rules, defaults={'migration': None, 'outlier_threshold': 6.0},
                  paper='Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" '
                  '(NeurIPS 2022)')
