"""A shallower model from a subset of a model's own blocks (DistilBERT's student initialization).

    student, sparams, layer_map = select_layers(teacher, tparams)            # every other block
    student, sparams, layer_map = select_layers(teacher, tparams, (0, 3))    # blocks 0 and 3

`layer_map` pairs hidden-state indices (0: embeddings, i: output of block i) of student and teacher, as
`DistillConfig.layer_map` takes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from jaxcompress.models.base import Model


def every_other(num_layers: int) -> tuple[int, ...]:
  """Blocks 0, 2, 4, ...: one of every two, the first kept (DistilBERT's initialization)."""
  return tuple(range(0, num_layers, 2))


def select_layers(teacher: Model, params: dict, layers: Sequence[int] | None = None
                  ) -> tuple[Model, dict, tuple[tuple[int, int], ...]]:
  """(student spec, student params, layer map): the teacher with only `layers` (block indices in increasing
  order; default `every_other`) kept, and the teacher's other weights. The map pairs the embeddings (0, 0) and student
  block i's output with that of the teacher block it came from; the student's arrays are its own copies."""
  n = teacher.num_layers(params)
  layers = every_other(n) if layers is None else tuple(int(i) for i in layers)
  if not layers:
    raise ValueError('select_layers: layers is empty; keep at least one block.')
  bad = [i for i in layers if not 0 <= i < n]
  if bad:
    raise ValueError(f'select_layers: layers={layers} names blocks {bad}, but the teacher has blocks 0..{n - 1}.')
  if list(layers) != sorted(set(layers)):
    raise ValueError(f'select_layers: layers={layers} must be increasing without repeats.')
  blocks = params[teacher.block_path]
  student_params = {**params, teacher.block_path: {k: blocks[i] for k, i in enumerate(layers)}}
  # The student owns its buffers: a training step that donates them must never free the teacher's.
  student_params = jax.tree.map(lambda x: x.copy() if hasattr(x, 'copy') else x, student_params)
  student = type(teacher)(dataclasses.replace(teacher.config, num_layers=len(layers)))
  layer_map = ((0, 0),) + tuple((k + 1, i + 1) for k, i in enumerate(layers))
  return student, student_params, layer_map
