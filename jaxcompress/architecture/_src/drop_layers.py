"""A shallower model from the model's own blocks (Sanh et al., "DistilBERT, a distilled version of BERT", 2019):
the blocks in `layers` are kept, the others dropped, every other weight shared with the model; train the result
by distillation from the uncompressed model (`distill` next in a recipe).

    student, small = architecture.drop_layers(model, params, None, config=architecture.DropLayersConfig(layers=(0, 2)))
"""

from __future__ import annotations

import dataclasses

from jaxcompress import registry
from jaxcompress.models import Model
from jaxcompress.models.depth import select_layers


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropLayersConfig:
  layers: tuple[int, ...] | None = None  # blocks kept, increasing (None: every other block, as DistilBERT)


def drop_layers(model: Model, params: dict, calib=None, *,
                config: DropLayersConfig = DropLayersConfig()) -> tuple[Model, dict]:
  """(the model with config.layers blocks, their params: copies of the kept blocks' and the other weights)."""
  student, small, _ = select_layers(model, params, config.layers)
  return student, small


def check(model: Model, params: dict, *, config: DropLayersConfig) -> None:
  """config.layers names existing blocks, increasing and without repeats (params may be abstract)."""
  if config.layers is None:
    return
  n, layers = model.num_layers(params), tuple(config.layers)
  bad = [i for i in layers if not 0 <= i < n]
  if not layers or bad:
    raise ValueError(f'layers={layers} names blocks {bad or "none"}, but the model has blocks 0..{n - 1}; keep '
                     f'some of {tuple(range(n))} (or layers=None: every other one).')
  if list(layers) != sorted(set(layers)):
    raise ValueError(f'layers={layers} must be increasing without repeats, e.g. {tuple(sorted(set(layers)))}.')


registry.register('drop_layers', DropLayersConfig, drop_layers, family='architecture',
                  forbids=('shared', 'architecture'), adds='architecture', check=check,
                  paper='Sanh et al., "DistilBERT" (2019): a shallower student from the teacher\'s own blocks '
                  '(train it with distill)')
