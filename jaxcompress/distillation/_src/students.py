"""Students built from a teacher: a subset of its layers (DistilBERT-style), or a fresh compact config.

    student, sparams, layer_map = select_layers(teacher, tparams)               # every other layer
    student = fresh(teacher, StudentConfig(depth=2, width=128, heads=2, ffn_ratio=2.0)); sparams = student.init(k)

`layer_map` pairs hidden-state indices (0: embeddings, i: output of block i) of student and teacher, as
`DistillConfig.layer_map` takes them. The recipe method `fresh_student` replaces the model by a fresh student
(train it with `distill` next).
"""

from __future__ import annotations

import dataclasses

import jax

from jaxcompress import registry
from jaxcompress.models import Model
# Students from the teacher's own blocks live in models/ (the architecture family's drop_layers runs them too).
from jaxcompress.models.depth import every_other, select_layers  # noqa: F401


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudentConfig:
  depth: int  # transformer blocks
  width: int  # hidden size
  heads: int  # query heads (width must be divisible by it)
  kv_heads: int | None = registry.field(None, range='[1, inf)')  # Llama key/value heads (None: the teacher's ratio)
  ffn_ratio: float = 4.0  # MLP width over hidden size

  def __post_init__(self):
    for name in ('depth', 'width', 'heads'):
      if getattr(self, name) < 1:
        raise ValueError(f'StudentConfig: {name}={getattr(self, name)} must be >= 1.')
    if self.width % self.heads:
      raise ValueError(f'StudentConfig: width={self.width} is not divisible by heads={self.heads}.')
    if self.kv_heads is not None and self.kv_heads < 1:
      raise ValueError(f'StudentConfig: kv_heads={self.kv_heads} must be >= 1 (or None: the teacher\'s ratio).')
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


def fresh_student(model, params, calib, *, config: StudentConfig, key: jax.Array | None = None):
  """(student `fresh(model, config)`, its random init with `key`, default ctx.key('fresh_student')): the
  uncompressed params are not used (the teacher stays calib.reference)."""
  del params
  ctx = registry.as_context(calib)
  student = fresh(model, config)
  return student, jax.jit(student.init)(ctx.key('fresh_student') if key is None else key)


registry.register('fresh_student', StudentConfig, fresh_student, family='distillation',
                  forbids=registry.COMPRESSED + ('architecture',), adds='architecture',
                  paper='a randomly initialised student of the model\'s family at the given depth and width (train it '
                  'with distill, e.g. Hinton et al. 2015)')
