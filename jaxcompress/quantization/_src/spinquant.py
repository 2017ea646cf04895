"""SpinQuant: a learned rotation of the residual stream (Liu et al., "SpinQuant: LLM Quantization with Learned
Rotations", ICLR 2025), on top of QuaRot's random Hadamard.

After `quarot` the norms are folded (every norm scale is 1), so any orthogonal R [D, D] rotates the residual stream
without changing the function (RMSNorm(hR) = RMSNorm(h)·R):

    embeddings  E ← E·R     readers (q, k, v, gate, up, LM head)  W ← Rᵀ·W     writers (o, down)  W ← W·R, b ← b·R

SpinQuant learns R (the paper's R1; starting from I, i.e. from QuaRot's random Hadamard) to minimise the next-token
loss of the model as it will be quantized: every chosen kernel fake-quantized by round-to-nearest (`bits`,
`group_size`, asymmetric) and, with act_bits, every chosen linear's input rounded per token, gradients straight
through the rounding. R stays on the Stiefel manifold by Cayley SGD (`cayley_sgd`, an optax transformation):

    G = ∂L/∂R,   A = G·Rᵀ − R·Gᵀ (skew),   R ← (I + η/2·A)⁻¹·(I − η/2·A)·R

With `r2=True` (default, the paper's R2) each block also learns a rotation R2 [head_dim, head_dim] of its heads'
values, on top of QuaRot's per-head Hadamard: v_proj's outputs (kernel columns and bias of each head) ·R2,
o_proj's inputs R2ᵀ· each head's rows; the attention weights' sum over positions passes through it, so the
function is unchanged, and o_proj's input (what 4-bit activations round there) is rotated by what was learned.

Then the rotations are fused into the dense weights (the same function, float rounding aside); the quantizer comes
after: `quarot(online=True) > spinquant(bits=4, act_bits=4) > gptq(bits=4) > act_quant(bits=4)`. down_proj's
online Hadamard (R4) is QuaRot's `online=True`.

RMSNorm models only (Llama, Qwen2, Mistral), after `quarot` (norms folded); GPT-2's LayerNorm would need R·1 = 1,
and other cases are refused by name.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress import core, registry
from jaxcompress.eval import token_nll
from jaxcompress.quantization._src.qat import fake_quant


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpinQuantConfig:
  bits: int = registry.field(4, range='[2, 8]')  # the weight bits the rotation is learned for (RTN, asymmetric)
  group_size: int | None = registry.field(128, range='[1, inf)')  # rows per scale, None: per output column
  act_bits: int | None = registry.field(None, range='[2, 16]')  # also round every chosen linear's input (W4A4)
  steps: int = registry.field(100, range='[0, inf)')  # Cayley SGD steps, one calibration batch each (cycling)
  lr: float = registry.field(1.5, range='(0, inf)')  # Cayley SGD's step size η (the paper's 1.5)
  r2: bool = True  # also learn each block's rotation of its heads' values (the paper's R2); False: R1 only
  rules: core.Rules = core.Rules()  # which block linears are fake-quantized in the loss (recipe: include=, exclude=)


class CayleyState(NamedTuple):
  count: jax.Array


def cayley_sgd(learning_rate: float) -> optax.GradientTransformation:
  """Cayley SGD on the orthogonal matrices [n, n] of a pytree: updates = R_new − R (so `optax.apply_updates` lands
  on R_new = (I + η/2·A)⁻¹·(I − η/2·A)·R with A = G·Rᵀ − R·Gᵀ), each R_new orthogonal when R is."""

  def init(params):
    del params
    return CayleyState(jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError('cayley_sgd: update needs params (the current rotations).')

    def one(g, r):
      g, r = g.astype(jnp.float32), r.astype(jnp.float32)
      a = g @ r.T - r @ g.T
      eye = jnp.eye(r.shape[0], dtype=jnp.float32)
      new = jnp.linalg.solve(eye + 0.5 * learning_rate * a, (eye - 0.5 * learning_rate * a) @ r)
      return new - r
    return jax.tree.map(one, grads, params), CayleyState(state.count + 1)

  return optax.GradientTransformation(init, update)


def rotate(model, params, r: jax.Array, r2: list[jax.Array] | None = None):
  """params (norms folded, dense) with the residual stream rotated by the orthogonal r [D, D] and, given r2 (one
  orthogonal [head_dim, head_dim] per block), each block's head values by its r2 (module docstring)."""
  new = {}
  flat = core.paths.flatten(params)
  f32 = lambda x: jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))
  for i in range(model.num_layers(params)):
    prefix = f'{model.block_path}/{i}/'
    for g in model.linear_groups:
      for k in g.kernels:
        w = flat[prefix + k]
        if g.norm is not None:
          new[prefix + k] = (r.T @ f32(w)).astype(w.dtype)
        else:
          new[prefix + k] = (f32(w) @ r).astype(w.dtype)
          bias = prefix + k.removesuffix('kernel') + 'bias'
          if bias in flat:
            new[bias] = (f32(flat[bias]) @ r).astype(flat[bias].dtype)
  if r2 is not None:  # on the columns of v_proj and the rows of o_proj: it commutes with r on their other side
    for i in range(model.num_layers(params)):
      new.update(_rotate_values(collections.ChainMap(new, flat), f'{model.block_path}/{i}/', r2[i], f32))
  table = flat['embed/tokens/embedding']
  new['embed/tokens/embedding'] = (f32(table) @ r).astype(table.dtype)
  if 'lm_head/kernel' in flat:
    new['lm_head/kernel'] = (r.T @ f32(flat['lm_head/kernel'])).astype(flat['lm_head/kernel'].dtype)
  return core.paths.replace(params, new)


VALUES = 'attn/v_proj/kernel'
VALUES_BIAS = 'attn/v_proj/bias'
OUTPUT = 'attn/o_proj/kernel'


def _rotate_values(flat, prefix, r2, f32):
  """{path: weight} of one block with each head's values rotated by r2 [hd, hd]: v_proj's output columns (and bias)
  of every head ·r2, o_proj's input rows of every head r2ᵀ·."""
  hd = r2.shape[0]
  wv, wo = flat[prefix + VALUES], flat[prefix + OUTPUT]
  new = {prefix + VALUES: (f32(wv).reshape(wv.shape[0], -1, hd) @ r2).reshape(wv.shape).astype(wv.dtype),
         prefix + OUTPUT: jnp.einsum('ij,nid->njd', r2, f32(wo).reshape(-1, hd, wo.shape[1])
                                     ).reshape(wo.shape).astype(wo.dtype)}
  if prefix + VALUES_BIAS in flat:  # v_proj's bias is rotated with its outputs (k_proj's would be one of r's readers)
    b = flat[prefix + VALUES_BIAS]
    new[prefix + VALUES_BIAS] = (f32(b).reshape(-1, hd) @ r2).reshape(b.shape).astype(b.dtype)
  return new


def check(model, params, *, config: SpinQuantConfig) -> None:
  """An RMSNorm family without experts, dense weights. params may be abstract."""
  del config
  name = type(model).__name__
  if getattr(model, 'family', '') != 'llama':
    raise ValueError(f'spinquant: {name} is not an RMSNorm decoder (Llama, Qwen2, Mistral); a learned rotation of '
                     'the residual stream commutes with RMSNorm only (LayerNorm needs R·1 = 1).')
  if model.config.moe_experts:
    raise ValueError(f'spinquant: moe_experts={model.config.moe_experts}: rotate the dense model before MoEfying it.')
  compressed = [(p, w) for p, w in core.paths.flatten(params).items() if core.is_compressed(w)]
  if compressed:
    path, w = compressed[0]
    raise ValueError(f'spinquant: {path} is already {type(w).__name__}; learn the rotation on the dense model '
                     '(recipe: quarot > spinquant > gptq(bits=4)).')


def _check_folded(params):
  flat = core.paths.flatten(params)
  unfolded = [p for p, w in flat.items() if p.endswith('norm/scale') and not bool(jnp.all(jnp.asarray(w) == 1))]
  if unfolded:
    raise ValueError(f'spinquant: {unfolded[0]} is not all ones: the norms must be folded into the linears first '
                     '(recipe: quarot > spinquant(...)), or the rotation would change the function.')


def spinquant(model, params, calib, *, config: SpinQuantConfig = SpinQuantConfig()):
  """The residual-stream rotation R learned for the quantized loss on the calibration batches, fused into the
  weights. calib: a `registry.Context` or a list of batches ([B, T] tokens or {'tokens', 'attention_mask'}).
  Returns (model, params): the same function, dense weights."""
  check(model, params, config=config)
  _check_folded(params)
  ctx = registry.as_context(calib)
  batches = [b if isinstance(b, dict) else {'tokens': b} for b in ctx.batches()]
  d = core.shape_of(core.paths.get(params, 'embed/tokens/embedding'))[1]
  quant = fake_quant(model.selection_rules(config.rules), bits=config.bits, group_size=config.group_size,
                     act_bits=config.act_bits)

  def loss(rs, params, tokens, mask):
    logits = model.apply(quant.forward(rotate(model, params, rs['r1'], rs.get('r2')), None), tokens[:, :-1])
    keep = jnp.ones_like(tokens[:, 1:]) if mask is None else mask[:, 1:]
    nll = token_nll(logits, tokens[:, 1:], keep)
    return jnp.sum(nll) / jnp.maximum(jnp.sum(keep), 1)

  opt = cayley_sgd(config.lr)

  @jax.jit
  def step(r, state, params, tokens, mask):
    value, g = jax.value_and_grad(loss)(r, params, tokens, mask)
    updates, state = opt.update(g, state, r)
    return optax.apply_updates(r, updates), state, value

  rs = {'r1': jnp.eye(d, dtype=jnp.float32)}
  if config.r2:
    rs['r2'] = [jnp.eye(model.config.dim_per_head, dtype=jnp.float32)] * model.num_layers(params)
  state = opt.init(rs)
  for s in range(config.steps):
    b = batches[s % len(batches)]
    mask = b.get('attention_mask')
    rs, state, _ = step(rs, state, params, jnp.asarray(b['tokens']), None if mask is None else jnp.asarray(mask))
  if not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(rs)):
    raise ValueError(f'spinquant: the learned rotation is not finite; lower lr={config.lr} or check the '
                     'calibration batches.')
  return model, rotate(model, params, rs['r1'], rs.get('r2'))


registry.register('spinquant', SpinQuantConfig, spinquant, family='quantization', forbids=registry.COMPRESSED,
                  calibrated=True, check=check,
                  paper='Liu et al., "SpinQuant: LLM Quantization with Learned Rotations" (ICLR 2025)')
