"""Magnitude pruning (Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS
2015): the selected kernels keep their largest |W|, per layer, per output or N:M along the input dimension, the
sparsity spread over the kernels uniformly, by ERK or under one global threshold. No calibration data.

    model, params = pruning.magnitude(model, params, None, config=pruning.MagnitudeConfig(sparsity=0.5))
"""

from __future__ import annotations

import dataclasses

from jaxcompress import core, registry
from jaxcompress.models import Model, Params
from jaxcompress.pruning._src import masks as masks_lib
from jaxcompress.pruning._src.oneshot import check_kernels, selection_rules


@registry.retired()
@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeConfig:
  sparsity: float = registry.field(0.5, range='(0.0, 1.0)')  # fraction of each selected kernel pruned (N:M: 1 - N/M)
  pattern: str | None = None  # 'per_layer' (default), 'per_output' or 'N:M' along the input dimension
  distribution: str = 'uniform'  # 'uniform', 'erk' or 'global' (one threshold over all selected kernels)
  rules: core.Rules = core.Rules()  # which kernels are pruned (recipe: include=, exclude=, embeddings=, head=)
  overrides: tuple[tuple[str, float], ...] = ()  # (path regex, sparsity) pairs replacing the distribution's

  def __post_init__(self):
    masks_lib.parse_pattern(self.pattern, caller='')  # 'N:M' with 0 < N < M, or a named pattern


def magnitude(model: Model, params: Params, calib=None, *, config: MagnitudeConfig = MagnitudeConfig()
              ) -> tuple[Model, Params]:
  """(model, params with the selected kernels `core.Masked` by |W|); the model's head patterns decide what is a
  head. calib: unused (magnitude needs no data)."""
  del calib
  rules = selection_rules(config, model)
  return model, masks_lib.prune(params, masks_lib.magnitude_score, sparsity=config.sparsity, pattern=config.pattern,
                                distribution=config.distribution, selection=rules, overrides=dict(config.overrides))


def check(model: Model, params: Params, *, config: MagnitudeConfig) -> None:
  """The kernels config chooses exist, and an N:M pattern fits their input widths (before any weight is read)."""
  check_kernels(model, params, config=config, blocks_only=False)


registry.register('magnitude', MagnitudeConfig, magnitude, family='pruning', forbids=registry.COMPRESSED,
                  adds='masked', check=check,
                  paper='Han et al., "Learning both Weights and Connections for Efficient Neural Networks" (NeurIPS '
                  '2015)')
