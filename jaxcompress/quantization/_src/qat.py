"""Quantization-aware training: selected kernels are fake-quantized in the forward pass of every step.

The forward uses round-to-nearest quantized weights; the backward treats the rounding as the identity (the
straight-through estimator), so the float32 master weights learn to sit well on the quantization grid.
With `act_bits`, each selected linear's input is also rounded per token (symmetric absmax, straight-through):
the kernel is wrapped in an `ActQuantized` leaf, which stays on the weight after `finalize` so that inference
rounds the activations as training did.

The method `qat` trains the model so (the task loss, `recovery.task_objective`) and ends with real
`core.Quantized` leaves on the very grids of training; `llm_qat` (llm_qat.py) does the same on a distillation loss.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax

from jaxcompress import core, registry
from jaxcompress.core.activations import ActQuantized, straight_through
from jaxcompress.quantization._src import common
from jaxcompress.train import recovery, transforms


def _check_act_bits(act_bits, where: str) -> None:
  if act_bits is not None and (not isinstance(act_bits, int) or not 2 <= act_bits <= 16):
    raise ValueError(f'{where}: act_bits={act_bits!r} must be an integer in 2..16 or None (weights only).')


def fake_quant(rules: core.Rules = core.Rules(), *, bits: int = 4, group_size: int | None = 128,
               symmetric: bool = False, fmt: str = 'int', act_bits: int | None = None) -> transforms.Transform:
  """A stateless Transform whose forward round-to-nearest quantizes the selected kernels (straight-through).

  rules: which kernels (`core.Rules`, default every block kernel); bits, group_size, symmetric, fmt: as in
  `core.quantize`; act_bits: also round each selected linear's input per token to this many bits (None: weights
  only). `Masked` kernels are quantized under their mask; other compressed kinds are refused.
  """
  _check_act_bits(act_bits, 'fake_quant')
  q = straight_through(lambda w: core.fake_quantize(w, bits=bits, group_size=group_size, symmetric=symmetric,
                                                    fmt=fmt, pack=False))

  def on_weight(w):
    if isinstance(w, core.Masked):
      return core.Masked(on_weight(w.value), w.mask)
    if core.is_compressed(w):
      raise TypeError(f'fake_quant: cannot fake-quantize a {type(w).__name__} weight; select dense or Masked ones.')
    return q(w)

  def forward(params, state):
    del state
    act = (lambda w: w) if act_bits is None else (lambda w: ActQuantized(w, bits=act_bits))
    return core.select_by(params, rules).map(lambda _, w: act(on_weight(w)), params)

  return transforms.Transform(forward=forward)


def finalize(params, rules: core.Rules = core.Rules(), *, bits: int = 4, group_size: int | None = 128,
             symmetric: bool = False, fmt: str = 'int', act_bits: int | None = None):
  """The selected kernels of QAT-trained params as real `core.Quantized` leaves, with the very grid `fake_quant`
  used in training (same arguments: the quantized model computes what the last training forward computed).

  `Masked` kernels become Masked(Quantized(value), mask), as `fake_quant` quantized their value under the mask;
  with act_bits the result is wrapped in `ActQuantized` (inference rounds the activations as training did).
  """
  _check_act_bits(act_bits, 'qat.finalize')
  def one(w):
    if isinstance(w, core.Masked):
      return core.Masked(one(w.value), w.mask)
    if core.is_compressed(w):
      raise TypeError(f'qat.finalize: cannot quantize a {type(w).__name__} weight; select dense or Masked ones.')
    return core.quantize(w, bits=bits, group_size=group_size, symmetric=symmetric, fmt=fmt)

  act = (lambda w: w) if act_bits is None else (lambda w: ActQuantized(w, bits=act_bits))
  return core.select_by(params, rules).map(lambda _, w: act(one(w)), params)


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig:
  bits: int = registry.field(4, range='[2, 8]')  # weight bits (2..8)
  # rows per scale (None: one per output column); kernels it does not divide: None
  group_size: int | None = registry.field(128, range='[1, inf)')
  symmetric: bool = False  # symmetric grid instead of min-max
  act_bits: int | None = None  # also round each block linear's input per token to this many bits (None: weights)
  fmt: str = 'int'  # weight grid: 'int' (min-max / absmax), 'nf4' (4 bits) or 'fp8'
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps with the fake-quantized forward
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  rules: core.Rules = core.Rules()  # which weights train quantized (recipe: include=, exclude=, embeddings=, head=)

  def __post_init__(self):
    if self.act_bits is not None and not 2 <= self.act_bits <= 16:
      raise ValueError(f'act_bits={self.act_bits} must lie in [2, 16] (or None: weights only).')
    if self.fmt not in ('int', 'nf4', 'fp8'):
      raise ValueError(f"fmt={self.fmt!r}; choose 'int', 'nf4' or 'fp8'.")


def qat_groups(model, params, group_size: int | None, rules: core.Rules = core.Rules()
               ) -> list[tuple[core.Rules, int | None]]:
  """(rules, group size) per set of the weights `rules` choose sharing a group size (group_size where it
  divides the weight's input width, else one scale per column, as `rtn`)."""
  sel = core.select_by(params, model.selection_rules(rules))
  if not len(sel):
    raise ValueError(f'qat: include={rules.include!r} exclude={rules.exclude!r} embeddings={rules.embeddings} '
                     f'head={rules.head} choose no weight; see model.select(params) for the paths.')
  groups: dict[int | None, list[str]] = {}
  for path, shape in zip(sel.paths, sel.shapes):
    gs = group_size if group_size is not None and shape[0] % group_size == 0 else None
    groups.setdefault(gs, []).append(f'^{re.escape(path)}$')
  return [(model.selection_rules(include=tuple(paths)), gs) for gs, paths in groups.items()]


def check(model, params, *, config: QATConfig) -> None:
  """A group_size the recipe gives divides the input width of some block kernel (`qat_groups` gives the others one
  scale per column; a size dividing none would quantize per column under another name; the default falls back
  silently on small models). Shapes only: params may be abstract."""
  if config.group_size != QATConfig().group_size:
    sel = core.select_by(params, model.selection_rules(config.rules))
    common.check_group_size_used(config.group_size, {p: s[0] for p, s in zip(sel.paths, sel.shapes)})


def quantization_aware(calib, name: str, model, params, config: QATConfig, objective_of, *, teacher: bool):
  """Trains under `fake_quant` of the weights `config.rules` choose (default: every block kernel), then quantizes them with the same grids (`finalize`).

  name: the method (its run directory); objective_of(model, context) -> the training objective; teacher: the
  objective reads the uncompressed params (`recovery.fit`'s teacher). `core.Masked` kernels train and end under
  their masks. Returns (model, params)."""
  ctx = registry.as_context(calib)
  params = common.dense_values(params)
  groups = qat_groups(model, params, config.group_size, config.rules)
  kw = dict(bits=config.bits, symmetric=config.symmetric, act_bits=config.act_bits, fmt=config.fmt)
  fq = [fake_quant(rules, group_size=gs, **kw) for rules, gs in groups]
  trained = recovery.fit(ctx, name, model, params, objective_of(model, ctx), steps=config.steps,
                         learning_rate=config.learning_rate, transforms=fq,
                         teacher=teacher)
  for rules, gs in groups:  # one compiled quantization per group, not one dispatch per array op
    trained = jax.jit(functools.partial(finalize, rules=rules, group_size=gs, **kw))(trained)
  return model, trained


def qat(model, params, calib, *, config: QATConfig = QATConfig()):
  """Quantization-aware training on the model's own loss (next-token NLL; encoders distil their embeddings
  from calib.reference_model), then real `core.Quantized` block kernels. calib: a `registry.Context` with
  training batches. Returns (model, params)."""
  return quantization_aware(calib, 'qat', model, params, config, recovery.task_objective, teacher=not model.causal)


registry.register('qat', QATConfig, qat, family='quantization', forbids=common.DENSE_OR_MASKED, adds='quantized',
                  trains=True, check=check,
                  paper='Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-'
                  'Only Inference" (CVPR 2018): straight-through fake quantization, then the same round-to-nearest '
                  'grid')
