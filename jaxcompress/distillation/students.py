"""Students built from a teacher: a subset of its layers (DistilBERT-style), or a fresh compact config.

    student, sparams, layer_map = select_layers(teacher, tparams)               # every other layer
    student = fresh(teacher, StudentConfig(depth=2, width=128, heads=2, ffn_ratio=2.0)); sparams = student.init(k)

`layer_map` pairs hidden-state indices (0: embeddings, i: output of block i) of student and teacher, as
`DistillConfig.layer_map` takes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from jaxcompress.models import Model


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentConfig:
  depth: int  # transformer blocks
  width: int  # hidden size
  heads: int  # query heads (width must be divisible by it)
  kv_heads: int | None = None  # key/value heads of a Llama student (None: the teacher's ratio, at least 1)
  ffn_ratio: float = 4.0  # MLP width over hidden size

  def __post_init__(self):
    for name in ('depth', 'width', 'heads'):
      if getattr(self, name) < 1:
        raise ValueError(f'StudentConfig: {name}={getattr(self, name)} must be >= 1.')
    if self.width % self.heads:
      raise ValueError(f'StudentConfig: width={self.width} is not divisible by heads={self.heads}.')
    if self.kv_heads is not None and self.heads % self.kv_heads:
      raise ValueError(f'StudentConfig: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}.')
    if self.ffn_ratio <= 0:
      raise ValueError(f'StudentConfig: ffn_ratio={self.ffn_ratio} must be positive.')


def fresh(teacher: Model, sc: StudentConfig) -> Model:
  """A model of the teacher's family, vocabulary and positions with the student's sizes (random init)."""
  c = teacher.config
  sizes = dict(num_layers=sc.depth, hidden_size=sc.width, num_heads=sc.heads,
               intermediate_size=int(round(sc.ffn_ratio * sc.width)))
  if hasattr(c, 'num_kv_heads'):
    kv = sc.kv_heads or max(1, sc.heads * c.num_kv_heads // c.num_heads)
    if sc.heads % kv:
      raise ValueError(f'fresh: heads={sc.heads} is not a multiple of the derived kv_heads={kv}; set kv_heads.')
    sizes.update(num_kv_heads=kv, head_dim=None)
  return type(teacher)(dataclasses.replace(c, **sizes))


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
