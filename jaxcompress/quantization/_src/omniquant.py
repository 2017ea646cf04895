"""OmniQuant: learnable weight clipping (LWC) and learnable equivalent transforms (LET), fitted block by block
(Shao et al., ICLR 2024).

LWC (the paper's eq. 2). Each group of a kernel (rows along `in`, one per output column) gets two learnable
clipping strengths γ = sigmoid(a), β = sigmoid(b) of its range:

    h = (γ·max(W) − β·min(W)) / (2^N − 1),   z = −⌊β·min(W) / h⌉,   W_q = clamp(⌊W / h⌉ + z, 0, 2^N − 1)

and the block computes with (W_q − z)·h. As every integer grid here, the range always holds 0 (max ≥ 0 ≥ min
after the clipping), so z is a code. Rounding passes gradients straight through; a = b = 4 at the start
(γ = β ≈ 0.982, as the paper's code).

LET (let=True, scales only, as the paper uses for LLaMA). Between a norm and the linears it feeds (attn_norm ->
q/k/v, mlp_norm -> gate/up; `Model.block_structure()`), a learnable positive s [in] per group: the norm's scale
(and bias) become scale / s, the kernels diag(s)·W, which computes the same function before quantizing; LWC
then clips diag(s)·W. With `let_pairs`, also between two linears where the second's input is linear in the
first's output: v_proj -> o_proj (attention mixes values linearly) and, in a gated MLP, up_proj -> down_proj
(silu(gate)·up is linear in up): the first's output columns (and bias) / s, the second's input rows · s (repeated
over the query heads that share a key/value head, under GQA); the paper's "out" transform. Not across an online
Hadamard (down_proj's input under `quarot(online=True)`). Every s is learned as log s and starts at 1, or with
`let_alpha=α` at SmoothQuant's s_j = max|x_j|^α / max|W_j|^(1−α) (as the paper initializes it; max|x_j| over the
block's calibration inputs, max|W_j| over the input row j of the kernels s scales). With act_bits (W4A8, W4A4) every chosen linear's
input is rounded per token while fitting (gradients straight through), so LET learns to move activation outliers
into the weights, as the paper's weight-activation setting does.

Both are trained together, block by block, with Adam on the mean squared error between the block's output in
the model quantized so far and the uncompressed model's output of that block (`calibration.run_blockwise`),
for `epochs` passes over the calibration batches; then s is folded into the norm and the kernels become plain
`core.Quantized` leaves holding exactly the codes, scales and zero points the block was trained with.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress import calibration, core, registry
from jaxcompress.quantization._src import act_quant, common
from jaxcompress.core.activations import ActQuantized

INIT = 4.0  # sigmoid(4) ≈ 0.982: the clipping strengths at the start


@dataclasses.dataclass(frozen=True, kw_only=True)
class OmniQuantConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8)
  # rows per clipping pair and scale (divides every chosen kernel's input dimension), None: per output column
  group_size: int | None = registry.field(128, range='[1, inf)')
  # passes over the calibration batches per block (0: LWC at its start, γ = β ≈ 0.982). The paper runs 20 epochs
  # of 128 single rows at lr 1e-2; with batches of 8 rows (16 steps an epoch) 10 epochs at 5e-2 measured best on
  # the fixture (W3 g128 perplexity 111.28; 20 epochs 111.33, 20 at 2e-2 111.45, a cosine decay of the rate 111.48)
  epochs: int = registry.field(10, range='[0, inf)')
  lr: float = registry.field(5e-2, range='(0, inf)')  # Adam's learning rate of the clipping logits a, b
  let: bool = False  # also learn the norm -> linear scales (LET, scales only)
  let_lr: float = registry.field(1e-3, range='(0, inf)')  # Adam's learning rate of log s
  # with let: also the linear -> linear scales (v_proj -> o_proj; up_proj -> down_proj in a gated MLP)
  let_pairs: bool = False
  # with let: start s at SmoothQuant's max|x|^α / max|W|^(1−α) per channel (the paper's start); None: s = 1
  let_alpha: float | None = registry.field(None, range='[0, 1]')
  # W4A8 / W4A4: the chosen linears' inputs rounded per token to act_bits (symmetric, dynamic) while fitting, and
  # the leaves returned as `ActQuantized` around the quantized kernels (as `act_quant` would wrap them)
  act_bits: int | None = registry.field(None, range='[2, 16]')
  rules: core.Rules = core.Rules()  # which block linears are quantized (recipe: include=, exclude=)

  def __post_init__(self):
    calibration.check_blocks_only(self.rules, 'omniquant')


def _ste_round(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def lwc_grid(w, a, b, bits, group_size):
  """Scale h and zero z [G, out] of w [in, out] under clipping logits a, b [G, out] (the module's eq. 2)."""
  g = _grouped(w, group_size)
  hi = jnp.maximum(jax.nn.sigmoid(a) * g.max(axis=1), 0.0)
  lo = jnp.minimum(jax.nn.sigmoid(b) * g.min(axis=1), 0.0)
  h = jnp.maximum((hi - lo) / (2 ** bits - 1), 1e-8)
  return h, _ste_round(-lo / h)


def lwc_codes(w, a, b, bits, group_size):
  """(codes [G, gs, out] as floats, h, z): LWC's rounding of w [in, out]; gradients pass straight through."""
  h, z = lwc_grid(w, a, b, bits, group_size)
  q = jnp.clip(_ste_round(_grouped(w, group_size) / h[:, None]) + z[:, None], 0, 2 ** bits - 1)
  return q, h, z


def lwc_fake(w, a, b, bits, group_size):
  """w [in, out] quantized and dequantized under the clipping logits a, b [G, out]."""
  q, h, z = lwc_codes(w, a, b, bits, group_size)
  return ((q - z[:, None]) * h[:, None]).reshape(w.shape)


def _grouped(w, group_size):
  gs = w.shape[0] if group_size is None else group_size
  return w.reshape(w.shape[0] // gs, gs, w.shape[1])


def lwc_leaf(w, a, b, bits, group_size) -> core.Quantized:
  """The `core.Quantized` leaf holding exactly LWC's codes, scales and zero points of w [in, out]."""
  wf = jnp.asarray(w, jnp.float32)
  q, h, z = lwc_codes(wf, a, b, bits, group_size)
  return common.make_leaf(q.reshape(wf.shape).astype(jnp.uint8), h, z, bits=bits, group_size=group_size,
                          shape=tuple(wf.shape), scale_dtype=jnp.asarray(w).dtype)


def _let_groups(model, block, kernels):
  """{norm path: kernels it feeds} for the groups of `kernels` whose every kernel is chosen and fed by a norm."""
  return {g.norm: tuple(g.kernels) for g in model.block_structure(block)
          if g.norm is not None and set(g.kernels) <= set(kernels)}


PAIRS = (('attn/v_proj', 'attn/o_proj'), ('mlp/up_proj', 'mlp/down_proj'))  # (first, second) linear modules


def _let_pairs(model, block, kernels) -> dict[str, str]:
  """{second kernel: first kernel} of the linear -> linear pairs LET scales, both chosen: v_proj -> o_proj, and
  up_proj -> down_proj where the MLP is gated and down_proj's input is not rotated online."""
  flat = core.paths.flatten(block)
  online = getattr(model.config, 'online_hadamard', 0)
  pairs = {}
  for first, second in PAIRS:
    gated = first != 'mlp/up_proj' or ('mlp/gate_proj/kernel' in flat and not online)
    if f'{first}/kernel' in kernels and f'{second}/kernel' in kernels and gated:
      pairs[f'{second}/kernel'] = f'{first}/kernel'
  return pairs


def _repeat_heads(s, rows: int, head_dim: int | None):
  """s [kv_heads·head_dim] as the scale of `rows` input rows: each key/value head's for its query heads (GQA)."""
  if s.shape[0] == rows:
    return s
  return jnp.repeat(s.reshape(-1, head_dim), rows // s.shape[0], axis=0).reshape(-1)


def _let(flat, lets, learn, pairs=None, head_dim=None):
  """LET's scales s = exp(log s): ({norm scale / bias or first linear's bias path: divided by s}, {kernel path:
  scale of its input rows}, {kernel path: divisor of its output columns})."""
  updates, rows, cols = {}, {}, {}
  divided = lambda p, s: (flat[p].astype(jnp.float32) / s).astype(flat[p].dtype)
  for norm, ks in lets.items():
    s = jnp.exp(learn['let'][norm])
    updates.update({p: divided(p, s) for p in (f'{norm}/scale', f'{norm}/bias') if p in flat})
    rows.update({k: s for k in ks})
  for second, first in (pairs or {}).items():
    s = jnp.exp(learn['pair'][second])
    bias = first.removesuffix('kernel') + 'bias'
    if bias in flat:
      updates[bias] = divided(bias, s)
    cols[first] = s
    rows[second] = _repeat_heads(s, flat[second].shape[0], head_dim)
  return updates, rows, cols


def _scaled(flat, k, rows, cols=None):
  """Kernel k [in, out] with its input rows · rows[k] and output columns / cols[k] (LET), float32."""
  w = flat[k].astype(jnp.float32)
  w = w * rows[k][:, None] if k in rows else w
  return w / cols[k][None, :] if cols and k in cols else w


def _apply(block, kernels, lets, pairs, head_dim, learn, config):
  """The block with LET's scales moved into norms and kernels and every chosen kernel LWC fake-quantized."""
  flat = core.paths.flatten(block)
  updates, rows, cols = _let(flat, lets, learn, pairs, head_dim)
  for k in kernels:
    updates[k] = _act(lwc_fake(_scaled(flat, k, rows, cols), *learn['lwc'][k], config.bits,
                               config.group_size).astype(flat[k].dtype), config)
  return core.paths.replace(block, updates)


def _act(w, config):
  return w if config.act_bits is None else ActQuantized(w, bits=config.act_bits)


def fit_block(model, block, data: calibration.BlockData, kernels, config: OmniQuantConfig):
  """The block with its `kernels` (paths within it) LWC-quantized (and LET-scaled) to reproduce data.targets."""
  flat = core.paths.flatten(block)
  lets = _let_groups(model, block, kernels) if config.let else {}
  pairs = _let_pairs(model, block, kernels) if config.let and config.let_pairs else {}
  head_dim = getattr(model.config, 'dim_per_head', None)
  groups = lambda k: flat[k].shape[0] // (flat[k].shape[0] if config.group_size is None else config.group_size)
  learn = {'lwc': {k: (jnp.full((groups(k), flat[k].shape[1]), INIT),) * 2 for k in kernels},
           'let': {n: jnp.zeros((flat[ks[0]].shape[0],), jnp.float32) for n, ks in lets.items()},
           'pair': {second: jnp.zeros((flat[first].shape[1],), jnp.float32) for second, first in pairs.items()}}
  if config.let_alpha is not None and (lets or pairs):
    learn['let'], learn['pair'] = _smooth_init(model, block, data, lets, pairs, head_dim, config.let_alpha)
  state = _optimizer(config).init(learn)
  step = _train_step(model, tuple(kernels), tuple(lets.items()), tuple(pairs.items()), head_dim, config)
  for _ in range(config.epochs):
    for j, r in enumerate(data.rows):
      learn, state, _ = step(learn, state, block, jnp.asarray(data.inputs[j]), jnp.asarray(data.targets[j]), r,
                             data.weights(j))
  bad = [p for p, x in core.paths.flatten(learn).items() if not np.all(np.isfinite(np.asarray(x)))]
  if bad:
    raise ValueError(f'omniquant: the fitted {", ".join(bad)} are not finite (the block error diverged); lower '
                     f'lr={config.lr} / let_lr={config.let_lr} or check the calibration batches for NaN.')
  updates, rows, cols = _let(flat, lets, learn, pairs, head_dim)
  for k in kernels:
    updates[k] = lwc_leaf(_scaled(flat, k, rows, cols).astype(flat[k].dtype), *learn['lwc'][k], config.bits,
                          config.group_size)
  return core.paths.replace(block, updates)


def _smooth_init(model, block, data: calibration.BlockData, lets, pairs, head_dim, alpha):
  """log s of SmoothQuant's s_j = max|x_j|^α / max|W_j|^(1−α) for each LET group ({norm: log s}) and pair ({second
  kernel: log s}): max|x_j| of the input the scaled kernels read, over the calibration batches' real tokens,
  max|W_j| over row j of those kernels. A pair's s lives on the first linear's outputs: under GQA the query heads
  sharing a key/value head take their largest."""
  readers = {ks[0]: ks for ks in lets.values()} | {second: (second,) for second in pairs}
  xmax = _input_absmax(model, block, data, tuple(readers))
  flat = core.paths.flatten(block)
  wmax = {k: jnp.max(jnp.stack([jnp.max(jnp.abs(flat[r].astype(jnp.float32)), axis=1) for r in rs]), axis=0)
          for k, rs in readers.items()}
  log_s = lambda k: jnp.log(jnp.clip(xmax[k] ** alpha / jnp.maximum(wmax[k], 1e-8) ** (1 - alpha), 1e-5, 1e5))
  let = {norm: log_s(ks[0]) for norm, ks in lets.items()}
  pair = {}
  for second, first in pairs.items():
    s, n = log_s(second), flat[first].shape[1]
    pair[second] = s if s.shape[0] == n else jnp.max(s.reshape(n // head_dim, -1, head_dim), axis=1).reshape(-1)
  return let, pair


def _input_absmax(model, block, data: calibration.BlockData, kernels: tuple[str, ...]) -> dict[str, jax.Array]:
  """{kernel path: max |x_j| per input channel} of the block's linears' inputs over the calibration batches (real
  tokens only)."""
  one = _absmax_step(model, kernels)
  batches = [one(block, jnp.asarray(data.inputs[j]), r, data.weights(j)) for j, r in enumerate(data.rows)]
  return {k: jnp.max(jnp.stack([b[k] for b in batches]), axis=0) for k in kernels}


@functools.lru_cache(maxsize=32)
def _absmax_step(model, kernels):
  """The jitted {kernel: max |x_j|} of one batch (cached: blocks of one shape compile once)."""
  @jax.jit
  def one(block, h, rows, weights):
    out = {}

    def observe(path, x):
      if path in kernels:
        keep = weights.reshape(-1, 1) > 0
        out[path] = jnp.max(jnp.where(keep, jnp.abs(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), 0.0), axis=0)
    model.block_with_inputs(block, h, model.context(rows.tokens, attention_mask=rows.attention_mask), observe)
    return out

  return one


def _optimizer(config):
  return optax.multi_transform({'lwc': optax.adam(config.lr), 'let': optax.adam(config.let_lr)},
                               {'lwc': 'lwc', 'let': 'let', 'pair': 'let'})


@functools.lru_cache(maxsize=32)
def _train_step(model, kernels, lets, pairs, head_dim, config):
  """The jitted Adam step of one block layout (cached: blocks of one shape compile once)."""
  opt = _optimizer(config)
  lets, pairs = dict(lets), dict(pairs)

  def loss_fn(learn, block, h, target, rows, weights):
    fake = _apply(block, kernels, lets, pairs, head_dim, learn, config)
    out = model.block(fake, h, model.context(rows.tokens, attention_mask=rows.attention_mask))
    err = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1).reshape(-1)
    return jnp.sum(err * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  @jax.jit
  def step(learn, state, block, h, target, rows, weights):
    loss, grads = jax.value_and_grad(loss_fn)(learn, block, h, target, rows, weights)
    updates, state = opt.update(grads, state, learn)
    return optax.apply_updates(learn, updates), state, loss

  return step


def omniquant(model, params, calib, *, config: OmniQuantConfig = OmniQuantConfig(), offload: bool = False):
  """OmniQuant of every block linear `config.rules` choose (default: all), block by block
  (`calibration.run_blockwise`). calib: a `registry.Context` or a list of calibration batches. `core.Masked`
  kernels are quantized on their kept values and keep their masks. Returns (model, params with
  `core.Quantized` kernels, in `ActQuantized` leaves with act_bits; with let=True, norms rescaled)."""
  model, params = _fit(model, params, calib, config=config, offload=offload)
  if config.act_bits is None:
    return model, params
  return act_quant.act_quant(model, params, config=act_quant.ActQuantConfig(bits=config.act_bits,
                                                                           rules=config.rules))


@common.masked_through
def _fit(model, params, calib, *, config, offload):
  batches = registry.as_context(calib).batches()
  chosen = _chosen(model, params, config)

  def fit(i, block, data):
    kernels = chosen.get(i, [])
    if not kernels:
      return block
    for k in kernels:
      common.check_finite(core.paths.get(block, k), f'block {i} {k}', 'omniquant')
    return fit_block(model, block, data, kernels, config)

  return model, calibration.run_blockwise(model, params, batches, fit, offload=offload)


def _chosen(model, params, config: OmniQuantConfig) -> dict[int, list[str]]:
  """{block index: its chosen linears in call order}, after `check`'s refusals."""
  common.check_bits(config.bits, 'omniquant')
  chosen: dict[int, list[str]] = {}
  for i, k, shape in common.chosen_2d(model, params, config.rules, 'omniquant'):
    common.check_group_size(config.group_size, shape[0], f'omniquant: block {i} {k}')
    chosen.setdefault(i, []).append(k)
  return chosen


def check(model, params, *, config: OmniQuantConfig) -> None:
  """Dense 2-D kernels only (stacked experts are refused by name), a group size dividing every chosen kernel's
  input dimension, and the recipe's rules choosing some linear."""
  _chosen(model, params, config)


registry.register('omniquant', OmniQuantConfig, omniquant, family='quantization', forbids=common.DENSE_OR_MASKED,
                  adds='quantized', calibrated=True, check=check,
                  paper='Shao et al., "OmniQuant: Omnidirectionally Calibrated Quantization for Large Language '
                  'Models" (ICLR 2024)')
