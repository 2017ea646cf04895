"""Optimizers and learning-rate schedules by name, for flags and configs."""

from __future__ import annotations

import dataclasses

import optax

OPTIMIZERS = ('adamw', 'adam', 'sgd', 'lion', 'adafactor')
SCHEDULES = ('constant', 'cosine', 'linear')


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  name: str = 'adamw'  # one of OPTIMIZERS
  learning_rate: float = 3e-4  # peak rate
  schedule: str = 'cosine'  # one of SCHEDULES, after a linear warm-up
  warmup_steps: int = 0
  total_steps: int = 1000  # where cosine/linear decay ends
  end_factor: float = 0.1  # final rate as a fraction of the peak
  weight_decay: float = 0.0
  grad_clip: float | None = 1.0  # global-norm clipping; None disables
  b1: float = 0.9
  b2: float = 0.95
  momentum: float = 0.9  # sgd only

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f'optimizer name {self.name!r} is unknown; choose one of {OPTIMIZERS}.')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'schedule {self.schedule!r} is unknown; choose one of {SCHEDULES}.')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate={self.learning_rate} must be positive.')
    if self.warmup_steps < 0 or self.total_steps < 1:
      raise ValueError(f'warmup_steps={self.warmup_steps} must be >= 0 and total_steps={self.total_steps} >= 1.')


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_factor
  decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
  if cfg.schedule == 'constant':
    main = optax.constant_schedule(peak)
  elif cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_factor)
  else:
    main = optax.linear_schedule(peak, end, decay_steps)
  if not cfg.warmup_steps:
    return main
  warm = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warm, main], [cfg.warmup_steps])


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """The optimizer of `cfg`; its learning rate is kept in the state (optax.inject_hyperparams), so the loop
  can log and show the rate each step used."""
  @optax.inject_hyperparams
  def base(learning_rate):
    if cfg.name == 'adamw':
      return optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    if cfg.name == 'adam':
      return optax.adam(learning_rate, b1=cfg.b1, b2=cfg.b2)
    if cfg.name == 'sgd':
      return optax.sgd(learning_rate, momentum=cfg.momentum)
    if cfg.name == 'lion':
      return optax.lion(learning_rate, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    return optax.adafactor(learning_rate, weight_decay_rate=cfg.weight_decay or None)

  opt = base(learning_rate=schedule(cfg))
  if cfg.grad_clip:
    opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
  return opt
