"""LLM-QAT: quantization-aware training distilled from the full-precision model (Liu et al., "LLM-QAT:
Data-Free Quantization Aware Training for Large Language Models", 2023).

The student is the model under `fake_quant` (or `add_lsq`) in the step's forward; the teacher is the same model
in full precision, its params passed as `TrainState.frozen` (`loop.fit(..., frozen=params)`). The loss is the
paper's: the cross-entropy of the student's next-token distribution against the teacher's whole distribution,
per token, at temperature 1,

    L = Σ_t mask_t · Σ_v p_teacher(v | x_<t) · (log p_teacher(v | x_<t) − log p_student(v | x_<t))

(the KL divergence; it differs from the cross-entropy by the teacher's entropy, a constant). The paper
generates its training text from the teacher; here any causal-LM batches serve (the fixture's own data).
This module keeps its own copy of the loss so that the quantization family does not depend on distillation.

The method `llm_qat` is `qat` (same config, same fake quantization and final grids) trained on this loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress import registry
from jaxcompress.eval import token_nll
from jaxcompress.quantization._src import common
from jaxcompress.quantization._src.qat import QATConfig, check, quantization_aware
from jaxcompress.train import objectives


def distillation_objective(model, *, teacher=None, remat: bool = False) -> objectives.Objective:
  """objective(params, frozen=teacher params, batch, rng): KL(teacher ‖ student) summed over masked tokens.

  teacher: the full-precision model when its architecture differs from `model`'s (default: `model` itself).
  Batches as for `objectives.causal_lm` (inputs, targets [B, T] int32, optional mask); metrics 'kl' and 'nll'
  (the student's next-token NLL on the targets), sums the step turns into per-token means.
  """
  t_model = model if teacher is None else teacher

  def objective(params, frozen, batch, rng):
    del rng
    if frozen is None:
      raise ValueError('llm_qat: the distillation objective needs the full-precision teacher params as '
                       'TrainState.frozen: loop.fit(..., frozen=params).')
    logits = model.apply(params, batch['inputs'], remat=remat).astype(jnp.float32)
    t_logits = jax.lax.stop_gradient(t_model.apply(frozen, batch['inputs']).astype(jnp.float32))
    if t_logits.shape != logits.shape:
      raise ValueError(f'llm_qat: teacher logits {t_logits.shape} and student logits {logits.shape} differ; '
                       'the teacher must share the vocabulary.')
    log_t, log_s = jax.nn.log_softmax(t_logits, -1), jax.nn.log_softmax(logits, -1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    mask = objectives.token_mask(batch)
    nll = token_nll(logits, batch['targets'])
    return (kl * mask).sum(), (mask.sum(), {'kl': (kl * mask).sum(), 'nll': (nll * mask).sum()})

  return objective


def _objective(model, ctx):
  if not model.causal:
    raise ValueError('llm_qat distils next-token distributions of a causal LM; for an encoder use qat (which '
                     'distils the embeddings).')
  return distillation_objective(model, teacher=ctx.reference_model)


def llm_qat(model, params, calib, *, config: QATConfig = QATConfig()):
  """`qat` trained on KL(teacher ‖ student) to the full-precision model (calib.reference_model, with
  calib.reference as its params) instead of the task loss; causal LMs only. calib: a `registry.Context` with
  training batches and the reference model. Returns (model, params)."""
  return quantization_aware(calib, 'llm_qat', model, params, config, _objective, teacher=True)


registry.register('llm_qat', QATConfig, llm_qat, family='quantization', forbids=common.DENSE_OR_MASKED,
                  adds='quantized', trains=True, check=check,
                  paper='Liu et al., "LLM-QAT: Data-Free Quantization Aware Training for Large Language Models" '
                  '(2023): QAT on KL to the full-precision model (trained on the corpus)')
