"""Selections: which weights a method touches, chosen by regular expressions over parameter paths.

    sel = select(params, include=r'mlp/.*/kernel$', exclude=r'layers/0/')
    print(sel)                   # a table of the chosen paths, kinds and shapes
    sel.assert_count(6)
    params = sel.map(lambda path, w: prune(w), params)

By default a selection holds the matmul kernels of the transformer blocks: every leaf named `kernel`, but not
the embeddings (`embedding` leaves), the norms (`scale`/`bias`) or the output heads. `embeddings=True` and
`head=True` add those.

Core knows no model, so which paths are heads is a parameter: `heads=` takes the regexes a model declares
(`Model.head_patterns`; `Model.select(params, ...)` passes them). Without it, `HEADS` matches the usual
top-level head names (`lm_head`, `mlm_head`, `pooler`).

Shared storage (`params['_shared']`) is never selected itself: it is selected through the places that use
it, and `Selection.map` transforms each selected storage once (see `Selection.map`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import paths as paths_lib
from jaxcompress.core import shared as shared_lib

KERNELS = r'(^|/)kernel$'
EMBEDDINGS = r'(^|/)embedding$'
HEADS = r'^(lm_head|mlm_head|pooler)/'  # default head paths when the caller gives no model's patterns

Patterns = str | Sequence[str]


def _compile(patterns: Patterns | None) -> tuple[re.Pattern, ...]:
  if patterns is None:
    return ()
  if isinstance(patterns, str):
    patterns = (patterns,)
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f'select: pattern {p!r} is not a valid regular expression ({e}).') from None
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Rules:
  """Path rules, frozen so a method config can hold them: the one way every method says which weights it touches.

  A recipe writes them as flat arguments of the method (`wanda(include=("mlp/",), exclude="layers/0/")`,
  `rtn(include=(), embeddings=True)` for the embedding tables only); Python passes `rules=core.Rules(...)`.
  """

  include: Patterns = KERNELS  # regexes; a path is chosen if any matches (re.search); () with embeddings: tables only
  exclude: Patterns = ()  # regexes; a chosen path is dropped if any matches
  embeddings: bool = False  # also choose embedding tables
  head: bool = False  # also choose the output heads' weights
  # regexes of head paths; None: the model's `head_patterns` where a model applies the rules
  # (`Model.selection_rules(rules)`), core's HEADS (lm_head/mlm_head/pooler) otherwise
  heads: Patterns | None = None

  def with_heads(self, heads: Patterns) -> Rules:
    """These rules with `heads` as the head paths, unless they name their own."""
    return self if self.heads is not None else dataclasses.replace(self, heads=heads)

  def matches(self, path: str) -> bool:
    if path.startswith(shared_lib.SHARED + paths_lib.SEP):
      return False  # storage is selected through the places that use it
    include = _compile(self.include) + (_compile(EMBEDDINGS) if self.embeddings else ())
    if not any(p.search(path) for p in include):
      return False
    heads = HEADS if self.heads is None else self.heads
    if not self.head and any(p.search(path) for p in _compile(heads)):
      return False
    if not self.embeddings and re.search(EMBEDDINGS, path):
      return False
    return not any(p.search(path) for p in _compile(self.exclude))


@dataclasses.dataclass(frozen=True)
class Selection:
  """An ordered set of parameter paths with the kinds and shapes they had when selected."""

  paths: tuple[str, ...]
  kinds: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]

  def __len__(self) -> int:
    return len(self.paths)

  def __iter__(self) -> Iterator[str]:
    return iter(self.paths)

  def __contains__(self, path: object) -> bool:
    return path in self.paths

  def __repr__(self) -> str:
    if not self.paths:
      return 'Selection(0 weights)'
    w = max(len(p) for p in self.paths)
    lines = [f'Selection({len(self)} weights)']
    lines += [f'  {p:<{w}}  {k:<10} {list(s)}' for p, k, s in zip(self.paths, self.kinds, self.shapes)]
    return '\n'.join(lines)

  def assert_count(self, n: int) -> Selection:
    if len(self) != n:
      raise AssertionError(f'selection has {len(self)} weights, expected {n}:\n{self!r}')
    return self

  def get(self, params: Any) -> dict[str, Any]:
    flat = paths_lib.flatten(params)
    return {p: flat[p] for p in self.paths}

  def map(self, fn: Callable[[str, Any], Any], params: Any) -> Any:
    """params with fn(path, weight) applied to each selected weight, the rest untouched.

    A selected place that holds a `Shared` reference is transformed through its storage: fn runs once per
    storage, on `params['_shared'][name]`, with the path of the first selected place that uses it; the result
    replaces the storage and every reference is kept (its recorded shape and dtype follow the new storage).
    So quantizing a tied weight yields one quantized tensor, still tied. Selecting only some of the places
    that share a storage is an error (transforming it would change the others too).
    """
    chosen = set(self.paths)
    flat = paths_lib.flatten(params)
    first: dict[str, str] = {}  # storage name -> first selected place using it
    for p in self.paths:
      x = flat.get(p)
      if isinstance(x, shared_lib.Shared):
        first.setdefault(x.name, p)
    if not first:
      return paths_lib.map_with_path(lambda p, x: fn(p, x) if p in chosen else x, params)
    store = shared_lib.storage(params)
    for name, p in first.items():
      if name not in store:
        raise KeyError(f"Selection.map: '{p}' refers to shared storage '{name}', which "
                       f"params['{shared_lib.SHARED}'] lacks (it has {sorted(store)}).")
      users = [q for q, x in flat.items() if isinstance(x, shared_lib.Shared) and x.name == name]
      left_out = [q for q in users if q not in chosen]
      if left_out:
        raise ValueError(f"Selection.map: shared storage '{name}' is used by {users}, but the selection leaves "
                         f'out {left_out}; transforming the storage would change them too. Select every place '
                         'that uses it, or untie them first (core.resolve).')
    new_store = {**store, **{name: fn(p, store[name]) for name, p in first.items()}}

    def one(p, x):
      if p not in chosen:
        return x
      if isinstance(x, shared_lib.Shared):
        return shared_lib.reference(x.name, new_store[x.name])
      return fn(p, x)

    out = paths_lib.map_with_path(one, {k: v for k, v in params.items() if k != shared_lib.SHARED})
    return {**out, shared_lib.SHARED: new_store}


def kind_of(x: Any) -> str:
  return type(x).__name__ if leaf_lib.is_compressed(x) else 'dense'


def select(params: Any, include: Patterns = KERNELS, exclude: Patterns = (), *, embeddings: bool = False,
           head: bool = False, heads: Patterns = HEADS) -> Selection:
  """The weights of `params` whose paths the rules choose (see module docstring).

  heads: regexes naming the output heads' paths (a model's `head_patterns`); left out unless head=True.
  """
  return select_by(params, Rules(include=include, exclude=exclude, embeddings=embeddings, head=head, heads=heads))


def select_by(params: Any, rules: Rules) -> Selection:
  # Bad patterns fail here, whatever the tree holds.
  _compile(rules.include), _compile(rules.exclude), _compile(HEADS if rules.heads is None else rules.heads)
  flat = paths_lib.flatten(params)
  chosen = [(p, x) for p, x in flat.items() if rules.matches(p)]
  return Selection(paths=tuple(p for p, _ in chosen), kinds=tuple(kind_of(x) for _, x in chosen),
                   shapes=tuple(leaf_lib.shape_of(x) for _, x in chosen))
