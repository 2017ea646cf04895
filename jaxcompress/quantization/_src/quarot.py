"""QuaRot: a randomized Hadamard rotation of the residual stream, fused into the weights (Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024), for weight-only quantization after it.

For an orthogonal Q (QQᵀ = I) a pre-norm transformer whose residual stream h is carried as hQ computes the same
function once every norm's scale is folded into the linears that read it and

    embeddings  E ← E·Q                   (token and learned-position tables)
    readers     W ← Qᵀ·diag(g)·W          (q, k, v, gate, up and the LM head; g: the norm's scale, then set to 1)
    writers     W ← W·Q,  b ← b·Q         (o_proj, down_proj)

since RMSNorm(hQ) = RMSNorm(h)·Q (‖hQ‖ = ‖h‖). Q = H·D·F: H the normalized Walsh–Hadamard matrix of the hidden size
(`core.hadamard`), D = diag(±1) drawn from `key` (reproducible) and F = I for RMSNorm models. LayerNorm models
(GPT-2) also subtract the mean, which commutes with Q only when Q·1 = 1: there F is the Householder reflection
that maps D·Hᵀ·1 to 1, so Q·1 = 1 and Qᵀ·1 = 1, LayerNorm(hQ) = LayerNorm(h)·Q for a scale of ones, and the norm's
bias b folds into the readers' biases (c ← c + b·W) or, before a bias-free LM head, stays as (b / g)·Q. With
`rotate_values`, each attention head's values are also rotated by the head-size Hadamard H_v (v_proj outputs
·H_v, o_proj inputs H_vᵀ·), which the attention weights' sum over positions passes through unchanged.

The rotations are fused, and the rotated model is the same function (logits equal to float rounding). One input
no fused rotation reaches is down_proj's (the MLP's gated product): with `online=True` (Llama family) its kernel
becomes Q_fᵀ·W for the Hadamard Q_f of the MLP width, and the model's forward rotates that input by x·Q_f
(`LlamaConfig.online_hadamard`, a fast Walsh–Hadamard transform), as 4-bit activations need (`act_quant`).
What it changes is the weights' coordinates: a few large input channels (outlier features) are spread over all of
them, so a grid per column (RTN, GPTQ, AWQ) loses less. A tied LM head stays tied when the
final norm's scale is all ones; otherwise the head becomes its own weight (the model's config gets
tie_embeddings=False), since the folded head Qᵀ·diag(g)·Eᵀ is no longer the rotated table's transpose.

Refused, each naming why: BERT-style post-norm encoders (their residual stream is a LayerNorm's output, scaled
per channel, which no rotation of the stream commutes with), mixture-of-experts MLPs, compressed weights (rotate
first: `quarot > gptq(bits=3)`), and hidden or head sizes with no Hadamard matrix here (`fallback='block'`: a
block-diagonal Hadamard of the largest supported block instead).

    quarot > gptq(bits=3, group_size=128)                                      # a recipe
    model, params = quantization.quarot(model, params, key=jax.random.key(0))  # Python
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress import core, registry
from jaxcompress.core import hadamard

FALLBACKS = ('error', 'block')


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuaRotConfig:
  rotate_values: bool = True  # also rotate each head's values (v_proj outputs, o_proj inputs) by a Hadamard
  fallback: str = 'error'  # a width with no Hadamard here: 'error', or 'block' (block-diagonal Hadamard)
  online: bool = False  # also rotate each MLP's down_proj input online (Llama family): for 4-bit activations


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rotation:
  """Q = H·D·F over n channels: H the normalized Hadamard (block-diagonal when `block`), D = diag(signs),
  F = I − 2vvᵀ/vᵀv when `reflect` is v (LayerNorm models: Q·1 = 1), F = I when None."""

  signs: jax.Array  # [n] float32, ±1
  block: int | None = dataclasses.field(default=None, metadata=dict(static=True))
  reflect: jax.Array | None = None  # [n] float32 or None

  def apply(self, x: jax.Array, axis: int = -1) -> jax.Array:
    """x contracted with Q's rows over `axis`: x·Q for a row vector (axis -1), Qᵀ·w for a kernel w [n, out]
    (axis 0). Computed in float32 (at least), returned in x's dtype."""
    x = jnp.asarray(x)
    return _apply(self, x, axis % x.ndim)

  def matrix(self) -> jax.Array:
    """Q as a dense [n, n] float32 matrix (tests, small widths)."""
    return self.apply(jnp.eye(self.signs.shape[0], dtype=jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnums=2)
def _apply(rot: Rotation, x: jax.Array, axis: int) -> jax.Array:
  y = hadamard.hadamard_transform(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis, block=rot.block)
  shape = [1] * y.ndim
  shape[axis] = -1
  y = y * rot.signs.reshape(shape).astype(y.dtype)
  if rot.reflect is not None:
    v = rot.reflect.astype(y.dtype)
    dots = jnp.tensordot(y, v, axes=([axis], [0]))  # [...] without axis
    y = y - (2.0 / jnp.dot(v, v)) * jnp.expand_dims(dots, axis) * v.reshape(shape)
  return y.astype(x.dtype)


def random_hadamard(key: jax.Array, n: int, *, block: int | None = None, keep_mean: bool = False) -> Rotation:
  """The rotation Q = H·D(·F) of n channels with signs D from `key`. keep_mean: add the reflection F that makes
  Q·1 = 1 (so a LayerNorm's mean subtraction commutes with Q)."""
  signs = jax.random.rademacher(key, (n,), jnp.float32)
  if not keep_mean:
    return Rotation(signs, block)
  ones = jnp.ones((n,), jnp.float32)
  a = signs * hadamard.hadamard_transform(ones, block=block)  # (H·D)ᵀ·1, of norm √n like 1
  v = ones - a
  return Rotation(signs, block, None if float(jnp.dot(v, v)) < 1e-6 * n else v)


class _Layout(NamedTuple):
  layer_norm: bool  # LayerNorm (mean subtraction and bias) or RMSNorm
  embeddings: tuple[str, ...]  # tables written into the residual stream
  head_dim: int


def _layout(model) -> _Layout:
  """What quarot needs of a family, or a ValueError naming why the family cannot be rotated."""
  name = type(model).__name__
  family = getattr(model, 'family', '')
  if family == 'bert':
    raise ValueError(f'quarot: {name} is a post-norm encoder: its residual stream is the output of a LayerNorm '
                     'with a per-channel scale and bias, and no rotation of the stream commutes with that scale, so '
                     'the rotation cannot be fused into the weights. Rotations need a pre-norm model (Llama, Qwen2, '
                     'Mistral, GPT-2), or online=True, which rotates each linear\'s input in the forward instead.')
  if family == 'llama':
    if model.config.moe_experts:
      raise ValueError(f'quarot: moe_experts={model.config.moe_experts}: mixture-of-experts MLPs (their router and '
                       'stacked experts) are not rotated; rotate the dense model before MoEfying it.')
    return _Layout(False, ('embed/tokens/embedding',), model.config.dim_per_head)
  if family == 'gpt2':
    return _Layout(True, ('embed/tokens/embedding', 'embed/positions/embedding'), model.config.head_dim)
  raise ValueError(f'quarot: no rotation layout for {name} (family {family!r}); supported: Llama, Qwen2, Mistral '
                   '(RMSNorm) and GPT-2 (LayerNorm).')


def _block(n: int, what: str, fallback: str) -> int | None:
  """None when width n has a Hadamard matrix, else the fallback's block or a ValueError."""
  if fallback not in FALLBACKS:
    raise ValueError(f'quarot: fallback={fallback!r}; choose one of {FALLBACKS}.')
  if hadamard.supported(n):
    return None
  b = hadamard.largest_block(n)
  if fallback == 'block' and b > 1:
    return b
  raise ValueError(f'quarot: {what} {n} is not 2^k times a Hadamard order this package builds (1, '
                   f'{", ".join(map(str, hadamard.ORDERS[:6]))}, ...). '
                   + (f"fallback='block' rotates blocks of {b} instead." if b > 1 else
                      'No Hadamard block divides it either.'))


def check(model, params, *, config: QuaRotConfig) -> None:
  """The family can be rotated and its hidden and head sizes have a Hadamard matrix (or a block with
  fallback='block'). params may be abstract (shapes only)."""
  if getattr(model, 'family', '') == 'bert' and config.online:
    _online_block(model, config.fallback)
    if config.rotate_values:
      _block(model.config.head_dim, 'head size', config.fallback)
    return
  layout = _layout(model)
  d = core.shape_of(core.paths.get(params, layout.embeddings[0]))[1]
  _block(d, 'hidden size', config.fallback)
  if config.rotate_values:
    _block(layout.head_dim, 'head size', config.fallback)
  if config.online:
    _online_block(model, config.fallback)


def _online_block(model, fallback: str) -> int:
  """The Hadamard size of the online rotations, or a ValueError: Llama, the MLP width (down_proj's input, or a
  block of it); BERT, the hidden size (every linear input but o_proj's; it must divide the MLP width)."""
  family = getattr(model, 'family', '')
  if family not in ('llama', 'bert'):
    raise ValueError(f'quarot: online=True rotates the input of a Llama-family MLP\'s down_proj (or of every BERT '
                     f'linear) in the forward; {type(model).__name__} has no online rotation here. Use online=False '
                     '(fused rotations only).')
  if model.config.online_hadamard:
    raise ValueError(f'quarot: online=True: the model already rotates its inputs online '
                     f'(online_hadamard={model.config.online_hadamard}); rotate it once.')
  if family == 'llama':
    n = model.config.intermediate_size
    return _block(n, 'MLP width (intermediate_size)', fallback) or n
  d, f = model.config.hidden_size, model.config.intermediate_size
  if f % d:
    if fallback != 'block':
      raise ValueError(f"quarot: online=True: hidden size {d} does not divide intermediate_size {f}; fallback='block' "
                       f'rotates blocks of {hadamard.largest_block(math.gcd(d, f))}.')
    return hadamard.largest_block(math.gcd(d, f))
  return _block(d, 'hidden size', fallback) or d


def _quarot_online_bert(model, params, config: QuaRotConfig):
  """BERT (post-norm): no fused rotation of the stream exists, so every linear reading it (q, k, v, up_proj) and
  down_proj get their input rotated online (kernels stored as Qᵀ·W); with rotate_values each head's values are
  rotated by a head-size Hadamard fused into v_proj and o_proj, as in the pre-norm path."""
  n = _online_block(model, config.fallback)
  hd = model.config.head_dim
  per_head = (Rotation(jnp.ones((hd,), jnp.float32), _block(hd, 'head size', config.fallback))
              if config.rotate_values else None)
  flat = core.paths.flatten(params)
  new = {}
  for i in range(model.num_layers(params)):
    prefix = f'{model.block_path}/{i}/'
    for m in model.online_rotated:
      new[prefix + m] = hadamard.hadamard_transform(_dense(flat, prefix + m), axis=0, block=n)
    if per_head is not None:
      block = {m: new.get(prefix + m, _dense(flat, prefix + m)) for m in _VALUE_PATHS if prefix + m in flat}
      new.update({prefix + m: w for m, w in _rotate_values(block, per_head, hd).items()})
  model = type(model)(dataclasses.replace(model.config, online_hadamard=n))
  return model, core.paths.replace(params, new)


def _dense(flat: dict, path: str) -> jax.Array:
  w = flat[path]
  if core.is_compressed(w):
    raise ValueError(f'quarot: {path} is already {type(w).__name__}; rotate the dense model before compressing it '
                     '(recipe: quarot > gptq(bits=3)).')
  return jnp.asarray(w)


def _rotate_block(block: dict[str, jax.Array], rot: Rotation, per_head: Rotation | None, *, groups: tuple,
                  layer_norm: bool, head_dim: int) -> dict[str, jax.Array]:
  """One block's new weights {path within the block: array}: each norm folded into the linears that read it and
  their inputs rotated (Qᵀ·diag(g)·W, biases c + b·W), the writers' outputs rotated (W·Q, b·Q), and with
  `per_head` each head's values. groups: ((norm or None, module paths), ...) as `model.linear_groups`."""
  for norm, modules in groups:
    for m in modules:
      if layer_norm and norm is not None and f'{m}/bias' not in block:
        raise ValueError(f'quarot: {m} has no bias to take the bias of {norm}.')
  return _rotate_block_jit(block, rot, per_head, groups, layer_norm, head_dim)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _rotate_block_jit(block, rot, per_head, groups, layer_norm, hd):
  new = {}
  f32 = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  for norm, modules in groups:
    if norm is None:  # writers of the residual stream
      for m in modules:
        for leaf in ('kernel', 'bias'):
          if f'{m}/{leaf}' in block:
            new[f'{m}/{leaf}'] = rot.apply(block[f'{m}/{leaf}'], axis=-1)
      continue
    g = f32(block[f'{norm}/scale'])
    b = f32(block[f'{norm}/bias']) if layer_norm else None
    for m in modules:
      w = block[f'{m}/kernel']
      if b is not None:
        c = block[f'{m}/bias']
        new[f'{m}/bias'] = (f32(c) + b @ f32(w)).astype(c.dtype)
      new[f'{m}/kernel'] = rot.apply(g[:, None] * f32(w), axis=0).astype(w.dtype)
    new[f'{norm}/scale'] = jnp.ones_like(block[f'{norm}/scale'])
    if b is not None:
      new[f'{norm}/bias'] = jnp.zeros_like(block[f'{norm}/bias'])
  if per_head is not None:
    new.update(_rotate_values({m: new.get(m, block[m]) for m in _VALUE_PATHS if m in block}, per_head, hd))
  return new


_VALUE_PATHS = ('attn/v_proj/kernel', 'attn/v_proj/bias', 'attn/o_proj/kernel')


def _rotate_values(block: dict, per_head: Rotation, hd: int) -> dict:
  """Each head's values rotated by `per_head`: v_proj's outputs (kernel columns, bias) ·H_v, o_proj's inputs
  H_vᵀ· (kernel rows); `block` holds the `_VALUE_PATHS` present."""
  wv, wo = block['attn/v_proj/kernel'], block['attn/o_proj/kernel']
  new = {'attn/v_proj/kernel': per_head.apply(wv.reshape(wv.shape[0], -1, hd), axis=-1).reshape(wv.shape),
         'attn/o_proj/kernel': per_head.apply(wo.reshape(-1, hd, wo.shape[1]), axis=1).reshape(wo.shape)}
  if 'attn/v_proj/bias' in block:
    bv = block['attn/v_proj/bias']
    new['attn/v_proj/bias'] = per_head.apply(bv.reshape(-1, hd), axis=-1).reshape(bv.shape)
  return new


def quarot(model, params, calib=None, *, config: QuaRotConfig = QuaRotConfig(), key: jax.Array | None = None):
  """The model with its residual stream rotated by a random Hadamard Q and norms folded (module docstring): the
  same function, in other coordinates. calib: only its seed is used (the key defaults to
  `registry.as_context(calib).key('quarot')`); key: the PRNG key of D's signs. Returns (model, params): the
  model spec unchanged, or with tie_embeddings=False when a tied head had to be split (a new `lm_head/kernel`).
  """
  check(model, params, config=config)
  if getattr(model, 'family', '') == 'bert':
    return _quarot_online_bert(model, params, config)
  layout = _layout(model)
  key = registry.as_context(calib).key('quarot') if key is None else key
  flat = core.paths.flatten(params)
  d = core.shape_of(flat[layout.embeddings[0]])[1]
  rot = random_hadamard(key, d, block=_block(d, 'hidden size', config.fallback), keep_mean=layout.layer_norm)
  hd = layout.head_dim
  per_head = (Rotation(jnp.ones((hd,), jnp.float32), _block(hd, 'head size', config.fallback))
              if config.rotate_values else None)
  online = _online_block(model, config.fallback) if config.online else 0
  new: dict[str, jax.Array] = {}
  groups = tuple((g.norm, tuple(k.removesuffix('/kernel') for k in g.kernels)) for g in model.linear_groups)
  for i in range(model.num_layers(params)):
    prefix = f'{model.block_path}/{i}/'
    block = {p.removeprefix(prefix): _dense(flat, p) for p in flat if p.startswith(prefix)}
    updates = _rotate_block(block, rot, per_head, groups=groups, layer_norm=layout.layer_norm, head_dim=hd)
    if online:  # the forward computes (x·Q_f)·(Q_fᵀ·W): the same function, down_proj's input spread out
      for m in model.online_rotated:
        updates[m] = hadamard.hadamard_transform(updates[m], axis=0, block=online)
    new.update({prefix + p: w for p, w in updates.items()})

  # The head reads the final norm's output: fold it there (into the table itself only while that stays exact).
  g = _dense(flat, 'final_norm/scale')
  b = _dense(flat, 'final_norm/bias') if layout.layer_norm else None
  table = _dense(flat, 'embed/tokens/embedding')
  untie = 'lm_head/kernel' not in flat and not bool(jnp.all(g == 1))
  if 'lm_head/kernel' in flat or untie:
    w = _dense(flat, 'lm_head/kernel') if 'lm_head/kernel' in flat else table.T
    head = rot.apply(g.astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0).astype(w.dtype)
  new['final_norm/scale'] = jnp.ones_like(g)
  if b is not None:  # the head has no bias: b·Wᵀ = ((b / g)·Q)·(Qᵀ·diag(g)·Wᵀ)
    if bool(jnp.any((g == 0) & (b != 0))):
      raise ValueError('quarot: final_norm has a zero scale where its bias is not zero; its bias cannot be folded '
                       'into the bias-free LM head.')
    new['final_norm/bias'] = rot.apply(jnp.where(g == 0, 0.0, b / jnp.where(g == 0, 1.0, g)), axis=-1).astype(b.dtype)
  for path in layout.embeddings:
    new[path] = rot.apply(_dense(flat, path), axis=-1)

  head_update = {}
  if 'lm_head/kernel' in flat:
    new['lm_head/kernel'] = head
  elif untie:
    head_update = {'lm_head': {'kernel': head}}
    model = type(model)(dataclasses.replace(model.config, tie_embeddings=False))
  if online:
    model = type(model)(dataclasses.replace(model.config, online_hadamard=online))
  params = core.paths.replace(params, new)
  return model, {**params, **head_update}


registry.register('quarot', QuaRotConfig, quarot, family='quantization', forbids=registry.COMPRESSED, check=check,
                  paper='Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs" (NeurIPS 2024)')
