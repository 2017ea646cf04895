"""A recipe: an ordered list of stages across families, parsed and checked before any work.

    'sparsegpt(sparsity=0.5, pattern="2:4") > gptq(bits=4, group_size=128) > distill(steps=500)'

or a JSON file holding `[{"method": "sparsegpt", "sparsity": 0.5}, {"method": "gptq", "bits": 4}]` (or
`{"stages": [...]}`). Arguments are Python/JSON literals; lists become tuples.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import re
from typing import Any

from jaxcompress import core, registry


@dataclasses.dataclass(frozen=True)
class Stage:
  method: registry.Method  # the registered method
  config: Any  # its frozen config (registered defaults, then the recipe's arguments)
  args: tuple[tuple[str, Any], ...]  # the arguments as written (for the report)

  @property
  def name(self) -> str:
    return self.method.name

  def __str__(self) -> str:
    return f'{self.name}(' + ', '.join(f'{k}={v!r}' for k, v in self.args) + ')'


def split_stages(text: str) -> list[str]:
  """Top-level '>'-separated pieces of `text` (a '>' inside parentheses, brackets or quotes stays)."""
  pieces, depth, quote, start = [], 0, None, 0
  for i, c in enumerate(text):
    if quote:
      quote = None if c == quote else quote
    elif c in '\'"':
      quote = c
    elif c in '([{':
      depth += 1
    elif c in ')]}':
      depth -= 1
    elif c == '>' and depth == 0:
      pieces.append(text[start:i])
      start = i + 1
  pieces.append(text[start:])
  return [p.strip() for p in pieces]


def _parse_stage(text: str) -> tuple[str, dict[str, Any]]:
  if not text:
    raise ValueError('recipe: an empty stage (two ">" in a row, or one at an end).')
  try:
    node = ast.parse(text, mode='eval').body
  except SyntaxError as e:
    raise ValueError(f'recipe: cannot parse stage {text!r}; write name(arg=value, ...).') from e
  if isinstance(node, ast.Name):
    return node.id, {}
  if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
    raise ValueError(f'recipe: stage {text!r} must be name or name(arg=value, ...) with keyword arguments only.')
  kwargs = {}
  for kw in node.keywords:
    if kw.arg is None:
      raise ValueError(f'recipe: stage {text!r}: **{ast.unparse(kw.value)} is not an argument; write each one as '
                       'name=value.')
    if kw.arg in kwargs:
      raise ValueError(f'recipe: {node.func.id}: {kw.arg}= is given twice ({kw.arg}={kwargs[kw.arg]!r} and '
                       f'{kw.arg}={ast.unparse(kw.value)}); keep one.')
    try:
      kwargs[kw.arg] = ast.literal_eval(kw.value)
    except ValueError as e:
      raise ValueError(f'recipe: {node.func.id}: {kw.arg}={ast.unparse(kw.value)} is not a literal '
                       '(number, string, True/False/None, tuple or list).') from e
  return node.func.id, kwargs


def parse(recipe: str | list) -> list[Stage]:
  """Stages of a recipe string, a JSON file path ('*.json') or a list of {'method': name, **args} mappings.

  Raises ValueError naming the valid methods / fields for an unknown name or argument, and for stages that do
  not compose (see `plan`).
  """
  if isinstance(recipe, str) and recipe.strip().endswith('.json'):
    path = pathlib.Path(recipe.strip())
    if not path.is_file():
      raise ValueError(f'recipe: {path} is not a file (a JSON recipe is a list of {{"method": ..., args}}).')
    recipe = read_json(path)
    if isinstance(recipe, dict) and not isinstance(recipe.get('stages'), list):
      raise ValueError(f"recipe: '{path}' holds an object without a \"stages\" list; write "
                       '[{"method": name, args...}, ...] or {"stages": [...]}.')
  if isinstance(recipe, dict):
    recipe = recipe.get('stages', recipe)
  if isinstance(recipe, str):
    raw = [_parse_stage(s) for s in split_stages(recipe)]
  elif isinstance(recipe, list):
    raw = []
    for item in recipe:
      if not isinstance(item, dict) or 'method' not in item:
        raise ValueError(f'recipe: JSON stage {item!r} must be an object with a "method" key.')
      raw.append((item['method'], {k: v for k, v in item.items() if k != 'method'}))
  else:
    raise ValueError(f'recipe: {recipe!r} is neither a recipe string, a JSON file nor a list of stages.')
  if not raw:
    raise ValueError('recipe: no stages.')
  stages = []
  for name, kwargs in raw:
    method = registry.get(name)
    stages.append(Stage(method, registry.make_config(method, kwargs), tuple(kwargs.items())))
    check_patterns(stages[-1])
  plan(stages)
  return stages


def read_json(path: pathlib.Path) -> Any:
  """The JSON in `path`; a ValueError naming the file and the line and column of a syntax error or of a key an
  object gives twice (Python's json would keep the last)."""
  try:
    return json.loads(path.read_text(), object_pairs_hook=_unique_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f"recipe: '{path}' is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.") from None
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"recipe: cannot read '{path}' ({type(e).__name__}: {e}).") from None
  except _DuplicateKey as e:
    raise ValueError(f"recipe: '{path}': {e}") from None


class _DuplicateKey(ValueError):
  pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """A JSON object's dict, refusing a key given twice."""
  out = {}
  for k, v in pairs:
    if k in out:
      raise _DuplicateKey(f'the key "{k}" is given twice in the object {json.dumps(out)[:-1]}, ...}} '
                          f'({json.dumps(out[k])} and {json.dumps(v)}); keep one.')
    out[k] = v
  return out


RULE_PATTERNS = ('include', 'exclude')  # `core.Rules` fields holding path regexes (a string or a tuple of them)
PATTERN_FIELDS = ('within_block',)  # config fields of their own holding a path regex (`share`)


def check_patterns(stage: Stage) -> None:
  """Refuses a path regex of a stage's config (the rules' `include`, `exclude`, `share`'s `within_block`, the paths
  of `overrides`) that does not compile, naming the stage, the argument and Python's error."""
  config = stage.config
  rules = getattr(config, 'rules', None)
  found = [(f, getattr(rules, f)) for f in RULE_PATTERNS if isinstance(rules, core.Rules)]
  found += [(f, getattr(config, f)) for f in PATTERN_FIELDS if hasattr(config, f)]
  found = [(f, v, (v,) if isinstance(v, str) else v) for f, v in found if isinstance(v, (str, tuple))]
  overrides = getattr(config, 'overrides', ())
  if isinstance(overrides, tuple):  # (path regex, value) pairs
    found.append(('overrides', overrides, tuple(o[0] for o in overrides if isinstance(o, tuple) and o)))
  for name, value, regexes in found:
    for rx in regexes:
      if not isinstance(rx, str):
        continue
      try:
        re.compile(rx)
      except re.error as e:
        raise ValueError(f'recipe: {stage.name}: {name}={value!r}: {rx!r} is not a valid regular expression '
                         f'({e}); write a Python regex (a literal ( [ . + * ? takes a backslash before it).') from None


def scopes(stage: Stage) -> tuple[str, ...]:
  """Which weights a stage changes: 'blocks', 'embeddings' or both (from a config's `rules`: `embeddings=True`
  adds the tables, and with `include=()` they are all it takes; training and architecture stages touch
  everything)."""
  rules = getattr(stage.config, 'rules', None)
  if isinstance(rules, core.Rules) and rules.embeddings:
    include = (rules.include,) if isinstance(rules.include, str) else tuple(rules.include)
    return ('embeddings',) if not include else ('blocks', 'embeddings')
  if stage.method.family in ('pruning', 'quantization', 'lowrank'):
    return ('blocks',)
  return ('blocks', 'embeddings')


def plan(stages: list[Stage], *, can_train: bool = True) -> list[dict[str, frozenset[str]]]:
  """The kernel states ({scope: tags}) before each stage; raises ValueError at the first stage that cannot run
  after the ones before it (or that trains when `can_train` is False)."""
  state = {'blocks': frozenset(), 'embeddings': frozenset()}
  added_by: dict[tuple[str, str], str] = {}
  states = []
  for i, s in enumerate(stages):
    for scope in scopes(s):
      clash = sorted(state[scope] & s.method.forbids)
      if clash:
        raise ValueError(f'recipe: stage {i + 1} {s.name} cannot run on {scope} weights already '
                         + ', '.join(f'{t} (by {added_by[scope, t]})' for t in clash)
                         + f'; {s.name} needs weights that are not {", ".join(sorted(s.method.forbids))}. '
                         'Reorder the stages (e.g. prune before quantizing) or drop one.')
    if s.method.trains and not can_train:
      raise ValueError(f'recipe: stage {i + 1} {s.name} trains, and this run has no training data.')
    states.append(dict(state))
    if s.method.adds:
      for scope in scopes(s):
        if s.method.family == 'sharing' and s.name == 'tie_embeddings' and scope == 'blocks':
          continue
        state[scope] = state[scope] | {s.method.adds}
        added_by.setdefault((scope, s.method.adds), f'stage {i + 1} {s.name}')
  return states


def to_string(stages: list[Stage]) -> str:
  return ' > '.join(str(s) for s in stages)


def run(stages: list[Stage], ctx: registry.Context, model, params, *, on_stage=None):
  """(model, params) after every stage in order; on_stage(i, stage, model, params, seconds) after each."""
  import time
  for i, s in enumerate(stages):
    t0 = time.perf_counter()
    model, params = s.method.fn(model, params, ctx, config=s.config)
    if on_stage is not None:
      on_stage(i, s, model, params, time.perf_counter() - t0)
  return model, params
