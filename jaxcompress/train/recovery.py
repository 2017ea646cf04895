"""What every method that trains shares: a short fine-tune of the compressed params (`fit`) and the objectives it
trains on: the task loss, or knowledge distillation from the uncompressed model (`kd_objective`).

    params = recovery.fit(calib, 'lora', model, params, recovery.kd_objective(model, calib), steps=100,
                          learning_rate=1e-3)

`calib` is the method's context (`registry.Context`: `.train` batches, `.reference_model` / `.reference` as the
teacher, `.seed`, `.run_dir`); it is read by attribute, so this layer does not import the registry.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

from jaxcompress.train import kd, loop, objectives, optim, state


def fit(calib, name: str, model, params, objective, *, steps: int, learning_rate: float, trainable=None, wrap=None,
        transforms=(), finish=None, teacher: bool = True):
  """Trains `params` for `steps` on calib.train with a warm-up + cosine AdamW.

  wrap(tx) -> tx replaces the optimizer (a method's optax wrapper); `transforms` run inside the step;
  finish(final TrainState) -> params (default: its params); teacher: hold the uncompressed params as `frozen`
  (objectives that distil read them). The run lives in calib.run_dir/stages/name, replaced each time.
  """
  if calib.train is None:
    raise ValueError(f'{name} trains, and this run has no training batches (Context(train=...)).')
  if steps <= 0:
    raise ValueError(f'{name}: steps={steps} must be > 0.')
  run_dir = pathlib.Path(calib.run_dir or '.') / 'stages' / name
  shutil.rmtree(run_dir, ignore_errors=True)
  cfg = loop.LoopConfig(steps=steps, batch_size=calib.train.batch_size, run_dir=str(run_dir), seed=calib.seed,
                        checkpoint_every=0, async_checkpoint=False, progress=False, resume=False,
                        log_every=max(1, steps // 4), mesh=(1, 1, 1))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=learning_rate, warmup_steps=max(1, steps // 10),
                                                   total_steps=steps))
  if wrap is not None:
    opt = wrap(opt)
  result = loop.fit(cfg, model=model, params=params, objective=objective, optimizer=opt, data=calib.train,
                    trainable=trainable or state.floating, frozen=calib.reference if teacher else None,
                    transforms=transforms)
  return result.state.params if finish is None else finish(result.state)


def uniform_layer_map(student, teacher, *, embeddings: bool = True) -> tuple[tuple[int, int], ...]:
  """TinyBERT's uniform mapping: student block m (1..M) <- teacher block m·N/M, plus the embeddings (0, 0)
  unless `embeddings` is False (attention transfer: the embeddings have no attention map)."""
  m, n = student.config.num_layers, teacher.config.num_layers
  return ((0, 0),) * embeddings + tuple((k, k * n // m) for k in range(1, m + 1))


def kd_objective(model, calib, *, output: str | None = None, temperature: float = 2.0, alpha: float = 0.5,
                 beta: float = 0.5, hidden_weight: float = 0.0, attention_weight: float = 0.0,
                 relation_weight: float = 0.0, relation_heads: int = 1,
                 layer_map: tuple[tuple[int, int], ...] = ()) -> Any:
  """Distillation from calib.reference_model: output=None picks 'soft_kl' for causal LMs and 'embedding' for
  encoders, which have no task loss (their objective is the KD term alone: alpha=1). Hidden-state or attention
  terms without a layer_map use TinyBERT's uniform map."""
  if calib.reference_model is None:
    raise ValueError('this method distils from the uncompressed model; give Context(reference_model=..., '
                     'reference=...).')
  output = output or ('soft_kl' if model.causal else 'embedding')
  alpha = alpha if model.causal else 1.0
  if hidden_weight or attention_weight:
    layer_map = layer_map or uniform_layer_map(model, calib.reference_model, embeddings=not attention_weight)
  extra = {'layer_map': layer_map} if (hidden_weight or attention_weight) else {}
  dcfg = kd.DistillConfig(output=output, temperature=temperature, alpha=alpha, beta=beta,
                          hidden_weight=hidden_weight, attention_weight=attention_weight,
                          relation_weight=relation_weight, relation_heads=relation_heads, **extra)
  return kd.distillation(model, calib.reference_model, dcfg)


def task_objective(model, calib) -> Any:
  """The model's own loss: next-token NLL for causal LMs; encoders have no task loss and distil their
  embeddings from the uncompressed model."""
  return objectives.causal_lm(model) if model.causal else kd_objective(model, calib)


def mixed_objective(model, calib, alpha: float) -> Any:
  """The task loss alone (alpha=0, causal LMs: no teacher forward), else KD mixed in with weight alpha."""
  if model.causal and alpha == 0.0:
    return objectives.causal_lm(model)
  return kd_objective(model, calib, alpha=alpha)
