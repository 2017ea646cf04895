"""Size accounting: the numbers every report in jaxcompress uses.

Per weight, host-side (values are read, so call it outside jit):
  params     dense parameters the model uses (a weight used by three layers through `Shared` counts three times)
  nonzero    non-zero entries among those
  stored     scalars actually stored (a masked weight stores its non-zeros, shared storage counts once)
  memory     bytes of the arrays held in memory now
  disk       bytes `core.serialize.save` writes (codes bit-packed, masks as bitmaps, sparse values only)
  bits/w     8 * disk / params
  flops/tok  FLOPs of the weight's matmul for one token (2·in·out dense; less for masked or low-rank
             weights, as a kernel exploiting the format would run); 0 for embeddings, norms and biases.

`summary(params)` groups these by block ("layers/3") and prints a table; `extra_flops` adds what the
parameters cannot show (attention scores, a head tied to the embedding), which `Model.flops_per_token` gives.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import paths as paths_lib
from jaxcompress.core import shared as shared_lib


@dataclasses.dataclass(frozen=True)
class Counts:
  params: int = 0
  nonzero: int = 0
  stored: int = 0
  memory: int = 0
  disk: int = 0
  flops: int = 0

  def __add__(self, other: Counts) -> Counts:
    return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

  @property
  def bits_per_weight(self) -> float:
    return 8 * self.disk / self.params if self.params else 0.0

  @property
  def sparsity(self) -> float:
    return 1 - self.nonzero / self.params if self.params else 0.0

  def as_dict(self) -> dict[str, float]:
    return {**dataclasses.asdict(self), 'bits_per_weight': self.bits_per_weight, 'sparsity': self.sparsity}


def _is_matmul_weight(path: str) -> bool:
  return path.rsplit(paths_lib.SEP, 1)[-1] == 'kernel'


def leaf_counts(params: Any, per_token: Callable[[str], bool] | None = None) -> dict[str, Counts]:
  """Counts for every weight, keyed by path.

  per_token: which `kernel` paths run once per token (default: all); others (a pooler applied once per
  sequence) count no FLOPs per token.
  """
  store = shared_lib.storage(params)
  out = {}
  for path, x in paths_lib.flatten(params).items():
    if path.startswith(shared_lib.SHARED + paths_lib.SEP):
      out[path] = Counts(stored=leaf_lib.stored_params(x), memory=leaf_lib.memory_bytes(x),
                         disk=leaf_lib.disk_bytes(x))
      continue
    used = shared_lib.resolve_leaf(x, store) if leaf_lib.is_compressed(x) else x
    if isinstance(used, shared_lib.Shared):
      raise ValueError(f"'{path}' points at shared storage '{x.name}', which is itself a reference.")
    counted = _is_matmul_weight(path) and len(leaf_lib.shape_of(used)) == 2 and (per_token is None or per_token(path))
    flops = leaf_lib.matmul_flops(used) if counted else 0
    out[path] = Counts(params=int(np.prod(leaf_lib.shape_of(used))), nonzero=leaf_lib.nonzeros(used),
                       stored=leaf_lib.stored_params(x), memory=leaf_lib.memory_bytes(x),
                       disk=leaf_lib.disk_bytes(x), flops=flops)
  return out


def group_of(path: str) -> str:
  """'layers/3/attn/q_proj/kernel' -> 'layers/3'; 'embed/tokens/embedding' -> 'embed'."""
  parts = path.split(paths_lib.SEP)
  for i, p in enumerate(parts[:-1]):
    if p.isdigit():
      return paths_lib.SEP.join(parts[:i + 1])
  return parts[0]


@dataclasses.dataclass(frozen=True)
class Summary:
  """Grouped counts plus a total; `str()` is the table."""

  rows: dict[str, Counts]
  total: Counts
  baseline: Counts | None = None

  @property
  def compression(self) -> float | None:
    """Disk bytes of the baseline over disk bytes now."""
    return self.baseline.disk / self.total.disk if self.baseline and self.total.disk else None

  def __str__(self) -> str:
    head = ('group', 'params', 'nonzero', 'stored', 'bits/w', 'memory', 'disk', 'MFLOP/tok')

    def cells(name: str, c: Counts) -> tuple[str, ...]:
      return (name, _num(c.params), _num(c.nonzero), _num(c.stored), f'{c.bits_per_weight:.2f}',
              _bytes(c.memory), _bytes(c.disk), f'{c.flops / 1e6:.3f}')

    body = [cells(k, c) for k, c in self.rows.items()] + [cells('total', self.total)]
    if self.baseline is not None:
      body.append(cells('baseline', self.baseline))
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: '  '.join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))
    rule = '-' * len(fmt(head))
    lines = [fmt(head), rule] + [fmt(r) for r in body[:len(self.rows)]] + [rule]
    lines += [fmt(r) for r in body[len(self.rows):]]
    if self.compression is not None:
      lines.append(f'compression (baseline disk / disk): {self.compression:.2f}x   '
                   f'sparsity: {self.total.sparsity:.1%}')
    return '\n'.join(lines)

  def as_dict(self) -> dict[str, Any]:
    return {'rows': {k: c.as_dict() for k, c in self.rows.items()}, 'total': self.total.as_dict(),
            'baseline': None if self.baseline is None else self.baseline.as_dict(),
            'compression': self.compression}


def summary(params: Any, *, baseline: Any = None, extra_flops: Mapping[str, int] | None = None,
            by: str = 'block', per_token: Callable[[str], bool] | None = None) -> Summary:
  """Accounting table of a parameter tree.

  baseline: another parameter tree (e.g. the uncompressed model) to compare disk bytes against.
  extra_flops: {row name: FLOPs per token} not carried by any weight (attention, tied head).
  by: 'block' groups weights by layer ("layers/3"), 'weight' lists every weight, 'total' shows one row.
  per_token: see `leaf_counts`.
  """
  if by not in ('block', 'weight', 'total'):
    raise ValueError(f"summary: by={by!r}; use 'block', 'weight' or 'total'.")
  rows: dict[str, Counts] = {}
  for path, c in leaf_counts(params, per_token).items():
    key = {'block': group_of(path), 'weight': path, 'total': 'all weights'}[by]
    rows[key] = rows.get(key, Counts()) + c
  for name, flops in (extra_flops or {}).items():
    rows[name] = rows.get(name, Counts()) + Counts(flops=int(flops))
  total = sum(rows.values(), Counts())
  base = None
  if baseline is not None:
    base = sum(leaf_counts(baseline, per_token).values(), Counts())
    base = base + Counts(flops=sum(int(f) for f in (extra_flops or {}).values()))
  return Summary(rows=_natural_order(rows), total=total, baseline=base)


def totals(params: Any) -> Counts:
  return sum(leaf_counts(params).values(), Counts())


def _natural_order(rows: dict[str, Counts]) -> dict[str, Counts]:
  """First-seen order, except that numbered parts sort by number ('layers/10' after 'layers/9')."""
  seen: dict[str, int] = {}
  for k in rows:
    for i, part in enumerate(k.split('/')):
      seen.setdefault('/'.join(k.split('/')[:i]) + '/' + re.sub(r'\d+', '#', part), len(seen))

  def key(k: str):
    parts = k.split('/')
    return [(seen['/'.join(parts[:i]) + '/' + re.sub(r'\d+', '#', p)], int(p) if p.isdigit() else 0)
            for i, p in enumerate(parts)]

  return {k: rows[k] for k in sorted(rows, key=key)}


def _num(n: int) -> str:
  for unit, div in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
    if abs(n) >= div:
      return f'{n / div:.2f}{unit}'
  return str(n)


def _bytes(n: int) -> str:
  for unit, div in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= div:
      return f'{n / div:.2f} {unit}'
  return f'{n} B'
