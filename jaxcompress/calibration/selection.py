"""Which block linears a layer-wise method compresses: its config's `rules` (`core.Rules`, written in recipes as
`include=`, `exclude=`) applied to the linears `Model.block_structure()` names.

    compress_block = calibration.only(model, params, model.selection_rules(config.rules), compress_block,
                                      caller='gptq')
    params, _ = calibration.run_sequential(model, params, batches, observer, compress_block)

A stacked expert weight ('layers/3/mlp/up' [E, in, out]) is matched as the kernel it stands for
('layers/3/mlp/up/kernel'), so the default rules (every kernel) choose it too. Layer-wise methods calibrate the
blocks' linears only: `embeddings=True` or `head=True` is refused (`check_blocks_only`), never ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxcompress import core
from jaxcompress.calibration.observers import Stats
from jaxcompress.models import Model, Params


def rule_path(model: Model, i: int, kernel: str) -> str:
  """The path rules see for block i's linear `kernel` (its path within the block): a stacked expert weight
  ('mlp/up') as the kernel it stands for ('layers/i/mlp/up/kernel')."""
  full = f'{model.block_path}/{i}/{kernel}'
  return full if kernel.rsplit('/', 1)[-1] == 'kernel' else f'{full}/kernel'


def block_linears(model: Model, params: Params) -> list[tuple[int, str]]:
  """(block index, linear path within the block) of every linear `Model.block_structure()` names, in order
  (params may be abstract: `model.abstract_params()`)."""
  return [(i, k) for i in range(model.num_layers(params))
          for group in model.block_structure(params[model.block_path][i]) for k in group.kernels]


def check_blocks_only(rules: core.Rules, caller: str) -> None:
  """Refuses rules choosing embedding tables or heads for a method that compresses the blocks' linears only."""
  if rules.embeddings or rules.head:
    which = ' and '.join(n for n in ('embeddings', 'head') if getattr(rules, n))
    raise ValueError(f'{which}=True: {caller} compresses the linears of the transformer blocks only '
                     '(calibrated block by block); leave it False, and quantize the embeddings or head with '
                     'rtn(include=(), embeddings=True) or rtn(include=(), head=True).')


def chosen(model: Model, params: Params, rules: core.Rules, *, caller: str) -> frozenset[str]:
  """The rule paths (`rule_path`) of the block linears `rules` choose; a ValueError naming the rules when none
  (prefixed by `caller:` unless caller is '', as in a registry `check`, whose errors the planner prefixes)."""
  check_blocks_only(rules, caller)
  linears = block_linears(model, params)
  out = frozenset(p for p in (rule_path(model, i, k) for i, k in linears) if rules.matches(p))
  if not out:
    raise ValueError(f'{caller + ": " if caller else ""}include={rules.include!r} exclude={rules.exclude!r} choose none of the '
                     f'{len(linears)} linears of the blocks (e.g. {rule_path(model, *linears[0]) if linears else "-"});'
                     ' see model.select(params) for the paths.')
  return out


def only(model: Model, params: Params, rules: core.Rules, compress_block: Callable[..., Params], *,
         caller: str) -> Callable[..., Params]:
  """compress_block (as `run_sequential` calls it: (i, block, stats[, summary])) seeing only the statistics of
  the block linears `rules` choose; a block or group with none of them is returned as it is. Every linear is
  still calibrated (the statistics of a group are computed together); the others are not compressed."""
  keep = chosen(model, params, rules, caller=caller)

  def run(i: int, block: Params, stats: dict[str, Stats], *summary: Any) -> Params:
    mine = {k: s for k, s in stats.items() if rule_path(model, i, k) in keep}
    return compress_block(i, block, mine, *summary) if mine else block
  return run
