"""AWQ: activation-aware weight quantization (Lin et al., MLSys 2024).

Salient input channels (large mean |x|) are protected by scaling them up before round-to-nearest quantization:
for α on a grid, s = mean|x|^α (normalised by sqrt(max s · min s)), the weight [in, out] becomes diag(s)·W and
the input x / s, and the α with the smallest layer-output error ‖X W − (X / s) Q(diag(s) W)‖² wins. Then, per
group and output column, the weight's range is shrunk (clipping search) to minimise the same output error of
that group. Errors are computed from H = XᵀX (tr(Δᵀ H Δ) = ‖X Δ‖²), so the streamed `calibration.hessian()`
statistics suffice and no activations are kept. The linears sharing an input (q/k/v; gate/up) share one s,
searched on their concatenated outputs, as in the paper.

Where x / s goes. `model.linear_groups` names the norm whose output feeds a group (attn_norm -> q/k/v,
mlp_norm -> gate/up): there 1/s is folded into the norm's scale and the kernels are plain `Quantized` leaves.
Groups without such a norm (o_proj, down_proj) keep the division as a `Prescaled(base, inv_scale)` leaf:
y = (x · inv_scale) @ base, one multiply of the activations per call (the layer-level `awq_layer` returns one
too).
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
from jaxcompress.core import serialize
from jaxcompress.quantization._src import common
from jaxcompress.quantization._src import quantizers


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Prescaled(core.Compressed):
  """W = diag(inv_scale) · base: the input is scaled per channel before the matmul.

  base: [in, out] weight (dense or compressed, e.g. `Quantized`); inv_scale: [in] float (its dtype is the
  leaf's dtype).
  """

  base: Any
  inv_scale: Any

  @property
  def shape(self):
    return core.shape_of(self.base)

  @property
  def dtype(self):
    return np.dtype(self.inv_scale.dtype)

  def materialize(self):
    return (core.materialize(self.base).astype(jnp.float32) * self.inv_scale[:, None]).astype(self.dtype)

  def matmul(self, x):
    return core.linear(x * self.inv_scale.astype(x.dtype), self.base)

  def stored_params(self):
    return core.stored_params(self.base) + int(np.size(self.inv_scale))

  def memory_bytes(self):
    return core.memory_bytes(self.base) + core.memory_bytes(self.inv_scale)

  def disk_bytes(self):
    return core.disk_bytes(self.base) + core.memory_bytes(self.inv_scale)

  def matmul_flops(self):
    return core.matmul_flops(self.base)


def _encode(w: Prescaled, out: serialize.Writer) -> dict:
  out.put('.inv_scale', w.inv_scale)
  return {'base': out.weight('.base', w.base)}


def _decode(desc: dict, src: serialize.Reader) -> Prescaled:
  return Prescaled(src.weight('.base', desc['base']), jnp.asarray(src.get('.inv_scale')))


serialize.register('prescaled', Prescaled, _encode, _decode)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class AWQConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8)
  group_size: int | None = registry.field(128, range='[1, inf)')  # rows per scale, or None for one per output column
  symmetric: bool = False  # symmetric grid instead of the asymmetric min-max one
  n_grid: int = 20  # α ∈ {0, 1/n_grid, ..., (n_grid-1)/n_grid}
  clip: bool = True  # also search a shrink factor of each group's range
  max_shrink: float = 0.5  # shrink factors 1, 1 - 1/n_grid, ... down to 1 - max_shrink (exclusive)
  # kernels (path substrings) left out of the clipping search. The paper's reference code skips q/k (their
  # errors pass through q·kᵀ and the softmax); ('q_proj', 'k_proj') does that, but measured slightly worse here
  # (fixture W4 g128 ppl 111.31 vs 111.29, MiniLM W4 cosine 0.97240 vs 0.97254), so every kernel is clipped
  no_clip: tuple[str, ...] = ()
  # which block linears are quantized (recipe: include=, exclude=); a group chosen in part keeps its scales in
  # the leaves (`Prescaled`), since folding them into the norm would change the kernels left float
  rules: core.Rules = core.Rules()

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'awq')


def _rtn(w, bits, group_size, symmetric):
  """Fake-quantized w [in, out] on the min-max grid."""
  g = w.reshape(-1, w.shape[0] if group_size is None else group_size, w.shape[1])
  lo, hi = jnp.minimum(g.min(axis=1), 0.0), jnp.maximum(g.max(axis=1), 0.0)
  scale, zero = quantizers.int_grid(lo, hi, bits, symmetric)
  return quantizers._fake_int(g, scale, zero, bits, symmetric)[1].reshape(w.shape)


def _scales(x_mean, alpha):
  s = jnp.maximum(x_mean ** alpha, 1e-4)
  return s / jnp.sqrt(s.max() * s.min())


def search(w: jax.Array, h: jax.Array, x_mean: jax.Array, config: AWQConfig) -> tuple[jax.Array, jax.Array]:
  """The AWQ searches for w [in, out], H = XᵀX [in, in], mean |x| [in] -> (s [in], clip bound [groups, out]).

  The weight to quantize is clip(diag(s)·W, ±bound); the input is x / s.
  """
  dt = jnp.promote_types(w.dtype, jnp.float32)
  return _search(w.astype(dt), h.astype(dt), x_mean.astype(dt), bits=config.bits,
                 group_size=config.group_size, symmetric=config.symmetric, n_grid=config.n_grid,
                 clip=config.clip, n_shrink=int(config.max_shrink * config.n_grid))


@functools.partial(jax.jit, static_argnames=('bits', 'group_size', 'symmetric', 'n_grid', 'clip', 'n_shrink'))
def _search(w, h, x_mean, *, bits, group_size, symmetric, n_grid, clip, n_shrink):
  def loss(alpha):
    s = _scales(x_mean, alpha)
    d = _rtn(w * s[:, None], bits, group_size, symmetric) / s[:, None] - w
    return jnp.sum(d * (h @ d))

  alphas = jnp.arange(n_grid, dtype=w.dtype) / n_grid
  losses = jax.lax.map(loss, alphas)
  s = _scales(x_mean, alphas[jnp.argmin(losses)])
  ws = w * s[:, None]
  gs = w.shape[0] if group_size is None else group_size
  groups = w.shape[0] // gs
  g = ws.reshape(groups, gs, -1)
  top = jnp.max(jnp.abs(g), axis=1)  # [groups, out]
  if not clip or n_shrink == 0:
    return s, top
  hs = h / s[:, None] / s[None, :]  # the Hessian of the scaled input x / s
  hg = jnp.stack([jax.lax.dynamic_slice(hs, (k * gs, k * gs), (gs, gs)) for k in range(groups)]) if groups <= 64 \
      else jax.vmap(lambda k: jax.lax.dynamic_slice(hs, (k * gs, k * gs), (gs, gs)))(jnp.arange(groups))

  def clip_err(p):
    bound = top * p
    c = jnp.clip(g, -bound[:, None], bound[:, None])
    lo, hi = jnp.minimum(c.min(axis=1), 0.0), jnp.maximum(c.max(axis=1), 0.0)
    scale, zero = quantizers.int_grid(lo, hi, bits, symmetric)
    d = quantizers._fake_int(c, scale, zero, bits, symmetric)[1] - g
    return jnp.einsum('gio,gij,gjo->go', d, hg, d)

  shrink = 1.0 - jnp.arange(n_shrink, dtype=w.dtype) / n_grid
  errs = jax.lax.map(clip_err, shrink)  # [n_shrink, groups, out]
  return s, top * shrink[jnp.argmin(errs, axis=0)]


def quantize_scaled(w: jax.Array, s: jax.Array, bound: jax.Array, config: AWQConfig) -> core.Quantized:
  """Quantized clip(diag(s)·W, ±bound) (min-max grid of the clipped weights), scales in w's dtype."""
  gs = w.shape[0] if config.group_size is None else config.group_size
  ws = w * s[:, None].astype(w.dtype)
  b = jnp.repeat(bound, gs, axis=0)
  clipped = jnp.clip(ws, -b, b).astype(w.dtype)
  return quantizers.quantize_weight(clipped, bits=config.bits, group_size=config.group_size,
                                    symmetric=config.symmetric)


def awq_from_stats(w: jax.Array, h: jax.Array, x_mean: jax.Array, config: AWQConfig = AWQConfig()) -> Prescaled:
  """AWQ of one linear from H = XᵀX [in, in] and mean |x| [in]. w: [in, out] -> Prescaled(Quantized, 1/s)."""
  _check(w, h, x_mean, config)
  s, bound = search(jnp.asarray(w), jnp.asarray(h), jnp.asarray(x_mean), config)
  return Prescaled(quantize_scaled(jnp.asarray(w), s, bound, config), (1.0 / s).astype(jnp.asarray(w).dtype))


def awq_layer(w: jax.Array, x: jax.Array, config: AWQConfig = AWQConfig()) -> Prescaled:
  """AWQ of one linear. w: [in, out]; x: [tokens, in] calibration inputs -> `Prescaled(Quantized, 1/s)`."""
  x = jnp.asarray(x)
  if x.shape[-1] != jnp.shape(w)[0]:
    raise ValueError(f'awq_layer: x [..., {x.shape[-1]}] does not match w {jnp.shape(w)} ([in, out]).')
  common.check_finite(x, 'x', 'awq_layer')
  x = x.reshape(-1, x.shape[-1]).astype(jnp.promote_types(x.dtype, jnp.float32))
  return awq_from_stats(w, x.T @ x, jnp.mean(jnp.abs(x), axis=0), config)


def _check(w, h, x_mean, config):
  where = 'awq'
  w = np.asarray(w)
  if w.ndim != 2 or np.shape(h) != (w.shape[0],) * 2 or np.shape(x_mean) != (w.shape[0],):
    raise ValueError(f'{where}: expected w [in, out], h [in, in], x_mean [in]; got {w.shape}, {np.shape(h)}, '
                     f'{np.shape(x_mean)}.')
  common.check_bits(config.bits, where)
  common.check_group_size(config.group_size, w.shape[0], where)
  if not isinstance(config.n_grid, int) or config.n_grid < 1:
    raise ValueError(f'{where}: n_grid={config.n_grid!r} must be a positive integer.')
  if not 0 <= config.max_shrink < 1:
    raise ValueError(f'{where}: max_shrink={config.max_shrink!r} must be in [0, 1).')
  common.check_finite(w, 'w', where)
  common.check_finite(h, 'the Hessian (calibration inputs)', where)
  common.check_finite(x_mean, 'mean |x| (calibration inputs)', where)


def awq(model, params, calib, *, config: AWQConfig = AWQConfig(), offload: bool = False):
  """AWQ of every block linear `config.rules` choose (default: all), block by block on the outputs of the already
  quantized blocks.

  calib: a `registry.Context` or a list of calibration batches (as `calibration.run_sequential` takes them);
  offload: keep the hidden states on the host between blocks. Groups of `model.block_structure()` with a norm
  get 1/s folded into that norm's scale ('<norm>/scale') and plain `Quantized` kernels; the others `Prescaled`
  ones. `Masked` kernels keep their masks over the quantized kept values. Returns (model, the new params).
  """
  batches = registry.as_context(calib).batches()
  observer = calibration.combine(h=calibration.hessian(), m=calibration.abs_mean())

  def compress_block(i, block, stats):
    kernels = tuple(stats)
    group = _group_of(model, block, kernels)
    fold = group.norm is not None and set(kernels) == set(group.kernels)
    ws = [core.paths.get(block, k) for k in kernels]
    st = stats[kernels[0]]  # the kernels of a group share their input and so their statistics
    h, x_mean = st['h']['xtx'], st['m']['abs_sum'] / jnp.maximum(st['m']['count'], 1)
    w_cat = jnp.concatenate([jnp.asarray(w) for w in ws], axis=1)
    _check(w_cat, h, x_mean, config)
    s, bound = search(w_cat, h, x_mean, config)
    splits = np.cumsum([w.shape[1] for w in ws])[:-1]
    updates = {}
    for k, w, b in zip(kernels, ws, jnp.split(bound, splits, axis=1)):
      if any(n in k for n in config.no_clip):
        b = jnp.full_like(b, jnp.inf)
      q = quantize_scaled(jnp.asarray(w), s, b, config)
      updates[k] = q if fold else Prescaled(q, (1.0 / s).astype(jnp.asarray(w).dtype))
    if fold:
      path = f'{group.norm}/scale'
      norm = core.paths.get(block, path)
      updates[path] = (jnp.asarray(norm, jnp.float32) / s).astype(jnp.asarray(norm).dtype)
      bias = core.paths.flatten(block).get(f'{group.norm}/bias')
      if bias is not None:  # LayerNorm: y = n·scale + bias, so both divide by s
        updates[f'{group.norm}/bias'] = (jnp.asarray(bias, jnp.float32) / s).astype(jnp.asarray(bias).dtype)
    return core.paths.replace(block, updates)

  compress_block = calibration.only(model, params, model.selection_rules(config.rules),
                                    common.through_masks(compress_block), caller='awq')
  params, _ = calibration.run_sequential(model, params, batches, observer, compress_block, per_group=True,
                                         keep_stats=False, offload=offload)
  return model, params


def _group_of(model, block, kernels):
  for g in model.block_structure(block):
    if set(kernels) <= set(g.kernels):
      return g
  raise ValueError(f'awq: no linear group of {type(model).__name__} holds {kernels}.')


registry.register('awq', AWQConfig, awq, family='quantization', forbids=common.DENSE_OR_MASKED,
                  adds='quantized', calibrated=True, check=common.check_block_group_size,
                  paper='Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration" '
                  '(MLSys 2024)')
