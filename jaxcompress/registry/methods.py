"""Methods by name: `register`, `get`, `describe`, configs from recipe arguments, ranges declared per field, the one
selection vocabulary (a config's `rules: core.Rules`, written in recipes as `include=`, `exclude=`, `embeddings=`,
`head=`), arguments a config no longer takes (`retired`), and methods of other packages (`load_plugins`)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import math
import re
import types
import typing
from typing import Any, Callable

from jaxcompress import core

TAGS = ('masked', 'quantized', 'lowrank', 'shared', 'adapter', 'architecture')
COMPRESSED = ('masked', 'quantized', 'lowrank', 'shared', 'adapter')  # what a dense-only method forbids
ENTRY_POINTS = 'jaxcompress.methods'  # the entry-point group other packages register their methods under
# A selecting config's `rules` fields, which a recipe writes as the method's own arguments (`wanda(include=...)`).
SELECTION_ARGS = ('include', 'exclude', 'embeddings', 'head')
_SELECTION_TYPES = {'include': str | tuple[str, ...], 'exclude': str | tuple[str, ...], 'embeddings': bool,
                    'head': bool}

Fn = Callable[..., tuple[Any, Any]]  # (model, params, calib, *, config) -> (model, params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  name: str  # the name recipes use
  config: type  # frozen dataclass of the method's arguments
  fn: Fn  # (model, params, calib, *, config) -> (model, params)
  family: str  # pruning | quantization | distillation | lowrank | sharing | architecture (or a plugin's own)
  paper: str  # the method's reference
  forbids: frozenset[str] = frozenset()  # kernel states (TAGS) it cannot run on
  adds: str | None = None  # the kernel state it leaves behind (None: unchanged)
  defaults: tuple[tuple[str, Any], ...] = ()  # config values replacing the dataclass defaults under this name
  calibrated: bool = False  # needs calibration batches
  trains: bool = False  # runs optimizer steps (needs calib.train)
  module: str = ''  # where it was registered
  # check(model, params, *, config) -> None: raises ValueError for what the method cannot run on, known from the
  # model spec and its weights' shapes alone (params may be abstract: `model.abstract_params()`); None: no check
  check: Callable[..., None] | None = None

  def apply(self, model, params, calib, config=None) -> tuple[Any, Any]:
    """Runs the method: `fn(model, params, calib, config=config)` (config: the registered defaults)."""
    return self.fn(model, params, calib, config=make_config(self, {}) if config is None else config)

  def fields(self) -> dict[str, Any]:
    """{argument: default under this name} as a recipe writes them (a selecting config's `rules` as its four
    flat arguments, `SELECTION_ARGS`)."""
    out = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
           for f in dataclasses.fields(self.config)}
    out.update(dict(self.defaults))
    if selects(self.config):
      rules = out.pop('rules')
      out.update({k: getattr(rules, k) for k in SELECTION_ARGS})
    return out


def selects(config: type) -> bool:
  """Whether a method config chooses the weights it touches: it holds `rules: core.Rules = core.Rules(...)` (a
  default the recipe arguments start from), which a recipe writes as the flat arguments `include=`, `exclude=`,
  `embeddings=`, `head=`."""
  return any(f.name == 'rules' and isinstance(f.default, core.Rules) for f in dataclasses.fields(config))


_RETIRED = '_retired_args'  # class attribute of a config: {argument it no longer takes: what replaced it}


def retired(**replacements: str):
  """Class decorator for a method config (above `@dataclasses.dataclass`): arguments it no longer takes, each
  refused with what replaced it, in Python (TypeError) and in recipes (`make_config`, ValueError); a spelling that
  is gone is never kept working beside the new one. A config holding `rules: core.Rules` also refuses the rules'
  own fields given to it directly (`WandaConfig(include=...)`: write `rules=core.Rules(include=...)`).

      @registry.retired(target="write include=(), embeddings=True for the embedding tables only")
      @dataclasses.dataclass(frozen=True, kw_only=True)
      class RTNConfig: ...
  """
  def wrap(cls):
    gone = dict(replacements)
    if selects(cls):
      for k in SELECTION_ARGS:
        gone.setdefault(k, f'it is a field of rules: {cls.__name__}(rules=core.Rules({k}=...)); a recipe writes '
                           f'{k}= as before')
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
      bad = [k for k in kwargs if k in gone]
      if bad:
        raise TypeError(f'{cls.__name__}: ' + '; '.join(f'{k}= is gone: {gone[k]}' for k in bad) + '.')
      init(self, *args, **kwargs)

    cls.__init__ = __init__
    setattr(cls, _RETIRED, {**getattr(cls, _RETIRED, {}), **gone})
    return cls
  return wrap


REGISTRY: dict[str, Method] = {}


def register(name: str, config: type, fn: Fn, *, family: str, paper: str, forbids=(), adds: str | None = None,
             defaults: dict[str, Any] | None = None, calibrated: bool = False, trains: bool = False,
             check: Callable[..., None] | None = None) -> Method:
  """Adds a method under `name` (replacing one of the same name) and returns it. check(model, params, *, config):
  the method's own refusals from the model's config and weight shapes, which `recipes.preflight` runs before any
  weight is loaded (a ValueError saying what to change)."""
  if not re.fullmatch(r'[a-z_][a-z0-9_]*', name):
    raise ValueError(f'register({name!r}): a method name is lower-case letters, digits and _ (a recipe writes it).')
  if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
    raise TypeError(f'register({name!r}): config {config!r} must be a frozen dataclass.')
  if not callable(fn):
    raise TypeError(f'register({name!r}): fn {fn!r} is not callable; give (model, params, calib, *, config).')
  if check is not None and not callable(check):
    raise TypeError(f'register({name!r}): check {check!r} is not callable; give (model, params, *, config) -> None.')
  bad = [t for t in (*forbids, *([adds] if adds else [])) if t not in TAGS]
  if bad:
    raise ValueError(f'register({name!r}): unknown kernel states {bad}; use {TAGS}.')
  names = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(defaults or {}) - names)
  if unknown:
    raise ValueError(f'register({name!r}): defaults {unknown} are not fields of {config.__name__} ({sorted(names)}).')
  for f in dataclasses.fields(config):
    if 'range' in f.metadata:
      _interval(f.metadata['range'])  # a malformed range fails at registration, not at the first bad value
  method = Method(name=name, config=config, fn=fn, family=family, paper=paper, forbids=frozenset(forbids),
                  adds=adds, defaults=tuple(sorted((defaults or {}).items())), calibrated=calibrated,
                  trains=trains, module=getattr(fn, '__module__', ''), check=check)
  REGISTRY[name] = method
  return method


def get(name: str) -> Method:
  if name not in REGISTRY:
    load_plugins()
  if name not in REGISTRY:
    raise ValueError(f'unknown method {name!r}; registered methods: {", ".join(sorted(REGISTRY))}. A method of '
                     f'another package registers through the {ENTRY_POINTS!r} entry points or --import=module.')
  return REGISTRY[name]


def describe() -> str:
  """Every registered method with its family, config fields (defaults) and paper (what --list_methods prints)."""
  load_plugins()
  lines = []
  for family in sorted({m.family for m in REGISTRY.values()}):
    lines.append(f'{family}:')
    for m in sorted((m for m in REGISTRY.values() if m.family == family), key=lambda m: m.name):
      args = ', '.join(f'{k}={v!r}' for k, v in m.fields().items())
      lines.append(f'  {m.name}({args})')
      lines.append(f'      {m.paper}')
  return '\n'.join(lines)


_LOADED: set[str] = set()


def load_plugins(modules: typing.Iterable[str] = ()) -> list[str]:
  """Imports the modules of the `jaxcompress.methods` entry points and `modules` (their `register` lines run);
  returns the modules imported now. A module that fails to import is named with the error, never skipped."""
  names = [ep.value.split(':')[0] for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)]
  done = []
  for module in [*names, *modules]:
    if module in _LOADED:
      continue
    try:
      importlib.import_module(module)
    except Exception as e:  # a plugin's own error, re-raised with where it came from
      origin = f'entry point of group {ENTRY_POINTS!r}' if module in names else '--import'
      raise ImportError(f'methods module {module!r} ({origin}) failed to import: {type(e).__name__}: {e}') from e
    _LOADED.add(module)
    done.append(module)
  return done


def field(default: Any = dataclasses.MISSING, *, range: str, **kwargs) -> Any:  # noqa: A002 (reads as it prints)
  """A config field whose value must lie in `range`, an interval as it is printed in errors: '[2, 8]',
  '(0.0, 1.0)', '[1, inf)'. `make_config` (every recipe argument) and `check_ranges` enforce it."""
  _interval(range)
  return dataclasses.field(default=default, metadata={'range': range}, **kwargs)


def _interval(text: str) -> tuple[float, float, bool, bool]:
  """'[lo, hi)' -> (lo, hi, lo closed, hi closed); 'inf' is unbounded."""
  m = re.fullmatch(r'\s*([\[(])\s*([-+.\w]+)\s*,\s*([-+.\w]+)\s*([\])])\s*', text)
  try:
    lo, hi = float(m.group(2)), float(m.group(3))
  except (AttributeError, ValueError):
    raise ValueError(f"range={text!r}: write an interval such as '[2, 8]', '(0.0, 1.0)' or '[1, inf)'.") from None
  return lo, hi, m.group(1) == '[', m.group(4) == ']'


def check_ranges(name: str, config) -> None:
  """Values outside their field's declared range fail (e.g. bits=12, sparsity=1.5), naming the range."""
  for f in dataclasses.fields(config):
    v = getattr(config, f.name)
    if 'range' not in f.metadata or v is None or isinstance(v, (bool, str, tuple)):
      continue
    lo, hi, lo_closed, hi_closed = _interval(f.metadata['range'])
    ok = (v >= lo if lo_closed else v > lo) and (math.isinf(hi) or (v <= hi if hi_closed else v < hi))
    if not ok or v != v:  # NaN compares false everywhere: refused
      raise ValueError(f'{name}: {f.name}={v!r} is outside {f.metadata["range"]}.')


def make_config(method: Method, kwargs: dict[str, Any]):
  """The method's config from the registered defaults and `kwargs`, each value type-checked against its field."""
  fields = {f.name: f for f in dataclasses.fields(method.config)}
  kwargs, flat = dict(kwargs), {}
  if selects(method.config):
    if 'rules' in kwargs:
      flat_args = ', '.join(f'{k}=' for k in SELECTION_ARGS)
      raise ValueError(f'{method.name}: rules= is written as its flat arguments {flat_args} '
                       f'(e.g. {method.name}(include=("mlp/",), exclude="layers/0/")).')
    flat = {k: _tuples(kwargs.pop(k)) for k in SELECTION_ARGS if k in kwargs}
  gone = getattr(method.config, _RETIRED, {})
  bad = [k for k in kwargs if k in gone]
  if bad:
    raise ValueError(f'{method.name}: ' + '; '.join(f'{k}= is gone: {gone[k]}' for k in bad) + '.')
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    sel = selects(method.config)
    valid = [k for k in fields if not (sel and k == 'rules')] + list(SELECTION_ARGS if sel else ())
    raise ValueError(f'{method.name}: unknown argument(s) {unknown}; valid: {", ".join(valid)}.')
  hints = typing.get_type_hints(method.config)
  values = dict(method.defaults)
  for k, v in kwargs.items():
    v = _tuples(v)
    if not _fits(v, hints[k]):
      raise ValueError(f'{method.name}: {k}={v!r} is not a {_show(hints[k])}.')
    values[k] = v
  for k, v in flat.items():
    if not _fits(v, _SELECTION_TYPES[k]):
      raise ValueError(f'{method.name}: {k}={v!r} is not a {_show(_SELECTION_TYPES[k])}.')
  if flat:
    values['rules'] = dataclasses.replace(values.get('rules', fields['rules'].default), **flat)
  try:
    config = method.config(**values)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{method.name}: {e}') from e
  check_ranges(method.name, config)
  return config


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
