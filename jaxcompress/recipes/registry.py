"""Every compression method by name, with its frozen config dataclass, its paper and what it composes with.

A method is registered in one line:

    register('gptq', quantization.GPTQConfig, stages.gptq, family='quantization', paper='Frantar et al. 2023',
             forbids=('quantized', 'lowrank'), adds='quantized', calibrated=True)

`apply(ctx, model, params, config) -> (model, params)` runs one stage; `forbids` names the kernel states (tags added
by earlier stages: 'masked', 'quantized', 'lowrank', 'shared', 'adapter', 'architecture') under which the method
cannot run, so a recipe that does not compose fails when it is planned, before any work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable

TAGS = ('masked', 'quantized', 'lowrank', 'shared', 'adapter', 'architecture')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
  """What a stage may use besides the params."""
  reference_model: Any  # the uncompressed model (teacher of distillation/recovery stages)
  reference: Any  # the uncompressed params
  calib: tuple  # calibration batches: {'tokens' [B, T] int32, optional 'attention_mask' [B, T]}
  train: Any = None  # fine-tuning batches (`.batch(step)` -> {'inputs', 'targets' | 'attention_mask'}); None: none
  seed: int = 0  # every random choice of every stage derives from it
  run_dir: str = ''  # where training stages keep their run directories
  mesh: Any = None  # jax Mesh splitting calibration batch rows over 'data' (None: one device)


Apply = Callable[[Context, Any, Any, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  name: str  # the name recipes use
  config: type  # frozen dataclass of the method's arguments
  apply: Apply  # (ctx, model, params, config) -> (model, params)
  family: str  # pruning | quantization | distillation | lowrank | sharing | architecture
  paper: str  # the method's reference
  forbids: frozenset[str] = frozenset()  # kernel states (TAGS) it cannot run on
  adds: str | None = None  # the kernel state it leaves behind (None: unchanged)
  defaults: tuple[tuple[str, Any], ...] = ()  # config values replacing the dataclass defaults under this name
  calibrated: bool = False  # needs calibration batches
  trains: bool = False  # runs optimizer steps (needs ctx.train)

  def fields(self) -> dict[str, Any]:
    """{field: default under this name} of the config."""
    out = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
           for f in dataclasses.fields(self.config)}
    out.update(dict(self.defaults))
    return out


REGISTRY: dict[str, Method] = {}


def register(name: str, config: type, apply: Apply, *, family: str, paper: str, forbids=(), adds: str | None = None,
             defaults: dict[str, Any] | None = None, calibrated: bool = False, trains: bool = False) -> Method:
  """Adds a method under `name` (replacing one of the same name) and returns it."""
  if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
    raise TypeError(f'register({name!r}): config {config!r} must be a frozen dataclass.')
  bad = [t for t in (*forbids, *([adds] if adds else [])) if t not in TAGS]
  if bad:
    raise ValueError(f'register({name!r}): unknown kernel states {bad}; use {TAGS}.')
  names = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(defaults or {}) - names)
  if unknown:
    raise ValueError(f'register({name!r}): defaults {unknown} are not fields of {config.__name__} ({sorted(names)}).')
  method = Method(name=name, config=config, apply=apply, family=family, paper=paper, forbids=frozenset(forbids),
                  adds=adds, defaults=tuple(sorted((defaults or {}).items())), calibrated=calibrated, trains=trains)
  REGISTRY[name] = method
  return method


def get(name: str) -> Method:
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r}; registered methods: {", ".join(sorted(REGISTRY))}.')
  return REGISTRY[name]


def describe() -> str:
  """Every registered method with its family, config fields (defaults) and paper (what --list_methods prints)."""
  lines = []
  for family in sorted({m.family for m in REGISTRY.values()}):
    lines.append(f'{family}:')
    for m in sorted((m for m in REGISTRY.values() if m.family == family), key=lambda m: m.name):
      args = ', '.join(f'{k}={v!r}' for k, v in m.fields().items())
      lines.append(f'  {m.name}({args})')
      lines.append(f'      {m.paper}')
  return '\n'.join(lines)


def make_config(method: Method, kwargs: dict[str, Any]):
  """The method's config from the registered defaults and `kwargs`, each value type-checked against its field."""
  fields = {f.name: f for f in dataclasses.fields(method.config)}
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'{method.name}: unknown argument(s) {unknown}; valid: {", ".join(fields)}.')
  hints = typing.get_type_hints(method.config)
  values = dict(method.defaults)
  for k, v in kwargs.items():
    v = _tuples(v)
    if not _fits(v, hints[k]):
      raise ValueError(f'{method.name}: {k}={v!r} is not a {_show(hints[k])}.')
    values[k] = v
  try:
    config = method.config(**values)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{method.name}: {e}') from e
  check_ranges(method.name, config)
  return config


RANGES = {  # field: (low, high, inclusive high) checked for every method that has the field
    'sparsity': (0.0, 1.0, False), 'bits': (2, 8, True), 'group_size': (1, None, True), 'steps': (1, None, True),
    'learning_rate': (0.0, None, True), 'keep': (0.0, 1.0, False), 'energy': (0.0, 1.0, True),
    'budget': (0.0, 1.0, False), 'rank': (1, None, True), 'kv_heads': (1, None, True), 'group': (1, None, True),
    'average_bits': (2, 8, True), 'outlier_fraction': (0.0, 1.0, False), 'iters': (1, None, True),
}
RANGE_EXCEPTIONS = {('pq', 'bits'): (1, 16, True)}


def check_ranges(name: str, config) -> None:
  """Values outside their field's range fail at parse time (e.g. bits=12, sparsity=1.5), naming the range."""
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    rng = RANGE_EXCEPTIONS.get((name, f.name), RANGES.get(f.name))
    if rng is None or v is None or isinstance(v, (bool, str, tuple)):
      continue
    lo, hi, closed = rng
    ok = v >= lo if lo != 0.0 or isinstance(lo, int) else v > lo
    ok = ok and (hi is None or (v <= hi if closed else v < hi))
    if not ok:
      span = f'({lo}, ' if isinstance(lo, float) and lo == 0.0 else f'[{lo}, '
      span += 'inf)' if hi is None else f'{hi}{"]" if closed else ")"}'
      raise ValueError(f'{name}: {f.name}={v!r} is outside {span}.')


def _tuples(v):
  """JSON lists become tuples (configs are frozen, hashable)."""
  return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _fits(v, hint) -> bool:
  """Whether a literal `v` fits the annotation `hint` (ints also fit floats; anything fits Any)."""
  origin = typing.get_origin(hint)
  if hint is Any:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_fits(v, h) for h in typing.get_args(hint))
  if hint is type(None):
    return v is None
  if origin is tuple:
    args = typing.get_args(hint)
    if not isinstance(v, tuple):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_fits(x, args[0]) for x in v)
    return len(args) == len(v) and all(_fits(x, a) for x, a in zip(v, args))
  if hint is float:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
  if hint is int:
    return isinstance(v, int) and not isinstance(v, bool)
  if isinstance(hint, type):
    return isinstance(v, hint)
  return True


def _show(hint) -> str:
  return getattr(hint, '__name__', None) or str(hint).replace('typing.', '')
