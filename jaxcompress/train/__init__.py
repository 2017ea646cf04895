"""The training engine every family hands its objectives and transforms to.

`loop.fit(LoopConfig, model=, params=, objective=, optimizer=, data=, transforms=)` trains, evaluates, checkpoints
and resumes bit for bit; `step` (the jitted step), `state` (TrainState), `objectives` (task losses), `kd` and
`losses` (knowledge distillation), `recovery` (the short fine-tune a compression method runs), `transforms` (the
stateful-transform protocol), `optim`, `sharding`, `checkpoint`, `metrics` and `evaluate`.
"""

from jaxcompress.train import (checkpoint, evaluate, kd, loop, losses, metrics, objectives, optim, recovery, sharding,
                               state, step, transforms)

__all__ = ['checkpoint', 'evaluate', 'kd', 'loop', 'losses', 'metrics', 'objectives', 'optim', 'recovery',
           'sharding', 'state', 'step', 'transforms']
