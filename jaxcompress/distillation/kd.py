"""Logit distillation: the student matches the teacher's temperature-softened next-token distribution.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

T^2 keeps the soft term's gradient on the scale of the hard one as T changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxcompress.eval import token_nll
from jaxcompress.models import Model
from jaxcompress.train import objectives


def logit_distillation(student: Model, teacher: Model, *, alpha: float = 0.5, temperature: float = 2.0,
                       remat: bool = False) -> objectives.Objective:
  """The objective above, summed over masked tokens; metrics 'kl' and 'nll' (sums, per token after the step).

  The teacher's params come in as the step's `frozen` argument (`TrainState.frozen`) and run in the same step
  under stop_gradient. Batches as for `objectives.causal_lm`: inputs, targets [B, T] int32, optional mask.
  """
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'logit_distillation: alpha={alpha} must lie in [0, 1].')
  if temperature <= 0:
    raise ValueError(f'logit_distillation: temperature={temperature} must be positive.')

  def objective(params, frozen, batch, rng):
    del rng
    if frozen is None:
      raise ValueError('logit_distillation needs the teacher params as TrainState.frozen (fit(frozen=...)).')
    logits = student.apply(params, batch['inputs'], remat=remat).astype(jnp.float32)
    teacher_logits = jax.lax.stop_gradient(teacher.apply(frozen, batch['inputs']).astype(jnp.float32))
    if teacher_logits.shape != logits.shape:
      raise ValueError(f'logit_distillation: teacher logits {teacher_logits.shape} and student logits '
                       f'{logits.shape} differ; student and teacher must share the vocabulary.')
    mask = objectives.token_mask(batch)
    t = temperature
    kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits / t, -1),
                                                     jax.nn.log_softmax(teacher_logits / t, -1))
    nll = token_nll(logits, batch['targets'])
    loss = (alpha * t * t * kl + (1 - alpha) * nll) * mask
    return loss.sum(), (mask.sum(), {'kl': (kl * mask).sum(), 'nll': (nll * mask).sum()})

  return objective
