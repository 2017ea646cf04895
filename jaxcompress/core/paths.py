"""Parameter paths: every weight in a tree is named by a string like "layers/3/attn/q_proj/kernel".

Compressed weights count as single leaves here (their inner arrays are not separate paths), so a rule written
against "…/kernel" keeps matching after that kernel becomes `Masked` or `Quantized`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from jaxcompress.core import leaf as leaf_lib

SEP = '/'


def key_str(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath: tuple) -> str:
  """A jax key path -> "a/b/0/c"."""
  return SEP.join(key_str(k) for k in keypath)


def flatten(tree: Any) -> dict[str, Any]:
  """{path: weight} in tree order, compressed weights kept whole."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf_lib.is_weight_leaf)[0]
  return {path_str(kp): x for kp, x in leaves}


def map_with_path(fn: Callable[[str, Any], Any], tree: Any, *rest: Any) -> Any:
  """tree_map where fn also receives the path string; compressed weights are passed whole."""
  return jax.tree_util.tree_map_with_path(lambda kp, x, *r: fn(path_str(kp), x, *r), tree, *rest,
                                          is_leaf=leaf_lib.is_weight_leaf)


def replace(tree: Any, updates: Mapping[str, Any]) -> Any:
  """A copy of `tree` with the weights at the given paths replaced. Unknown paths are an error."""
  known = flatten(tree)
  unknown = [p for p in updates if p not in known]
  if unknown:
    raise KeyError(f'replace: no weight at {unknown[:3]}; valid paths look like {next(iter(known), "?")!r}.')
  return map_with_path(lambda p, x: updates.get(p, x), tree)


def get(tree: Any, path: str) -> Any:
  """The weight (or subtree) at a path; integer keys may be written as digits."""
  node = tree
  for part in path.split(SEP) if path else []:
    if isinstance(node, Mapping):
      if part in node:
        node = node[part]
      elif part.isdigit() and int(part) in node:
        node = node[int(part)]
      else:
        raise KeyError(f"get: '{part}' of path '{path}' not found; keys here are {sorted(map(str, node))}.")
    elif isinstance(node, (list, tuple)) and part.isdigit():
      node = node[int(part)]
    else:
      raise KeyError(f"get: cannot descend into {type(node).__name__} at '{part}' of path '{path}'.")
  return node
