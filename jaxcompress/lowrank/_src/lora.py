"""LoRA adapters: W x + scale * (x a) b with the base W held fixed and only the factors a, b trained.

The base may be any weight: dense, `Masked`, `Quantized` (QLoRA: an NF4 base, `core.quantize(w, fmt='nf4')`),
or a `Shared` reference (per-layer deltas over shared storage). `merge` folds the adapters into dense weights
(exact up to float rounding for a dense base; a `Masked` or `Quantized` base becomes a dense array, since the
sum has neither the zero pattern nor the codes); `unmerge` recovers the adapted tree from merged weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core, registry
from jaxcompress.train import recovery
from jaxcompress.train import state as state_lib

# The `trainable` predicate for the training step: only the adapters' factors are updated.
LORA_TRAINABLE = state_lib.matching(r'/lora_(a|b)$')
# Recovery fine-tuning of factorized layers: only the factors of `LowRank` leaves are updated.
LOWRANK_TRAINABLE = state_lib.matching(r'/(a|b)$')


def add_lora(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
             rules: core.Rules = core.Rules()) -> Any:
  """Selected kernels become `LoRA(base, a, b)` with a ~ N(0, 1/in), b = 0, so the model is unchanged at first.

  a: [in, rank] float32, b: [rank, out] float32, scale = alpha / rank. Train with trainable=LORA_TRAINABLE.
  A selected place holding a `Shared` reference gets its own adapter over the reference (the storage stays
  shared), unlike `Selection.map`, which would give all users one adapter.
  """
  if rank < 1:
    raise ValueError(f'add_lora: rank={rank} must be >= 1.')
  sel = core.select_by(params, rules)
  if not len(sel):
    raise ValueError(f'add_lora: the rules include={rules.include!r} exclude={rules.exclude!r} match no weight; '
                     f'paths look like {next(iter(core.flatten(params)), "?")!r}.')
  for path, shape in zip(sel.paths, sel.shapes):
    if rank > min(shape):
      raise ValueError(f"add_lora: rank={rank} exceeds min(in, out)={min(shape)} of '{path}' {list(shape)}.")
  keys = dict(zip(sel.paths, jax.random.split(key, len(sel))))
  chosen = set(sel.paths)

  def adapt(path, w):
    if path not in chosen:
      return w
    d_in, d_out = core.shape_of(w)
    a = jax.random.normal(keys[path], (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
    return core.LoRA(base=w, lora_a=a, lora_b=jnp.zeros((rank, d_out), jnp.float32), scale=alpha / rank)

  return core.map_with_path(adapt, params)


def _delta(w: core.LoRA) -> jax.Array:
  return w.scale * (core.materialize(w.lora_a) @ core.materialize(w.lora_b))


def merge(params: Any) -> Any:
  """Every `LoRA` leaf folded into one dense float32 array base + scale·a·b ([in, out]); the rest untouched.

  `Shared` bases are resolved first (each layer's merged weight differs). The result exports to Hugging Face
  with `models.save_pretrained` like any dense tree.
  """
  resolved = core.resolve(params)
  return core.map_with_path(
      lambda p, w: (jnp.asarray(core.materialize(w.base), jnp.float32) + _delta(w))
      if isinstance(w, core.LoRA) else w, resolved)


def unmerge(merged: Any, adapted: Any, *, rtol: float = 1e-5) -> Any:
  """The `adapted` tree back from `merged = merge(adapted)`-like weights, checking they belong together.

  At every LoRA path of `adapted`, merged − scale·a·b must equal the adapter's base (to `rtol` of its largest
  magnitude); the base leaf of `adapted` is then kept as is (bit-exact, also for `Quantized` bases). A base the
  adapters were not trained on is an error naming the path.
  """
  flat_m = core.flatten(merged)
  for path, w in core.flatten(core.resolve(adapted)).items():
    if not isinstance(w, core.LoRA):
      continue
    if path not in flat_m:
      raise KeyError(f"unmerge: the adapters have a LoRA at '{path}', which the merged tree lacks.")
    check_base(path, flat_m[path], w, rtol=rtol, subtract=True)
  return adapted


def check_base(path: str, dense: Any, lora: core.LoRA, *, rtol: float = 1e-5, subtract: bool = False) -> None:
  """Raises unless `dense` (minus the adapter's delta when `subtract`) equals the adapter's base."""
  got = np.asarray(core.materialize(dense), np.float64)
  base = np.asarray(core.materialize(lora.base), np.float64)
  if got.shape != base.shape:
    raise ValueError(f"'{path}': weight of shape {got.shape}, but the adapter was trained on a base of shape "
                     f'{base.shape}.')
  if subtract:
    got = got - np.asarray(_delta(lora), np.float64)
  err = float(np.max(np.abs(got - base)))
  tol = rtol * max(float(np.max(np.abs(base))), 1e-12)
  if err > tol:
    raise ValueError(f"'{path}': this weight differs from the base the adapter was trained on (max |diff| "
                     f'{err:.3g} > {tol:.3g}); adapters only apply to their own base (e.g. a QLoRA adapter to '
                     'its NF4 base, not to the original dense weights).')


def merge_into(params: Any, adapters: Any, *, rtol: float = 1e-5) -> Any:
  """`params` with every adapter of `adapters` (a tree holding trained `LoRA` leaves) merged into its weight.

  Each target weight must be the base that adapter was trained on (checked, see `check_base`); the result at
  those paths is dense float32.
  """
  flat_p = core.flatten(core.resolve(params))
  updates = {}
  for path, w in core.flatten(core.resolve(adapters)).items():
    if not isinstance(w, core.LoRA):
      continue
    if path not in flat_p:
      raise KeyError(f"merge_into: the adapters have a LoRA at '{path}', which params lack.")
    check_base(path, flat_p[path], w, rtol=rtol)
    updates[path] = jnp.asarray(core.materialize(flat_p[path]), jnp.float32) + _delta(w)
  if not updates:
    raise ValueError('merge_into: `adapters` holds no LoRA leaf; pass the tree returned by add_lora (trained).')
  return core.paths.replace(core.resolve(params), updates)


# The method: adapters trained by distillation from the uncompressed model ------------------------------------------

@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
  rank: int = registry.field(8, range='[1, inf)')  # adapter rank
  lora_alpha: float = 16.0  # adapter scale numerator (scale = lora_alpha / rank)
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps (KD from the uncompressed model)
  learning_rate: float = registry.field(1e-3, range='(0.0, inf)')  # peak learning rate
  merge: bool = False  # fold the adapters into dense kernels afterwards (False keeps base + adapter leaves)
  rules: core.Rules = core.Rules()  # which kernels get adapters (recipe: include=, exclude=, head=)

  def __post_init__(self):
    if self.rules.embeddings:
      raise ValueError('embeddings=True: a LoRA adapter a·b is added to a linear\'s kernel, not to a lookup '
                       'table; leave it False.')


def lora(model: Any, params: Any, calib: Any, *, config: LoRAConfig = LoRAConfig(),
         key: jax.Array | None = None) -> tuple[Any, Any]:
  """The kernels `config.rules` choose (default: the blocks') get adapters (`add_lora`, a [in, rank] drawn from `key`, b [rank, out] = 0), trained
  for config.steps on calib.train by KD from calib.reference_model (`recovery.kd_objective`); only the factors
  change. key: None draws from calib.key('lora'). Over a quantized base (QLoRA) the base stays quantized."""
  ctx = registry.as_context(calib)
  key = ctx.key('lora') if key is None else key
  adapted = add_lora(params, key, rank=config.rank, alpha=config.lora_alpha,
                     rules=model.selection_rules(config.rules))
  objective = recovery.kd_objective(model, ctx)
  out = recovery.fit(ctx, 'lora', model, adapted, objective, steps=config.steps,
                     learning_rate=config.learning_rate, trainable=LORA_TRAINABLE)
  return model, merge(out) if config.merge else out


qlora = lora  # QLoRA is LoRA over a quantized base: the same function (and key), registered under its own name


registry.register('lora', LoRAConfig, lora, family='lowrank', forbids=('adapter', 'shared'), adds='adapter',
                  trains=True, paper='Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022), '
                  'trained by KD')
registry.register('qlora', LoRAConfig, qlora, family='lowrank', forbids=('adapter', 'shared'), adds='adapter',
                  trains=True, paper='Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (NeurIPS '
                  '2023): LoRA over a quantized base')
