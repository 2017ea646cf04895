"""Teacher outputs computed once and kept on disk: the top-k next-token log-probabilities of every position,
so an expensive teacher runs one pass and many student runs read it (safetensors files, never pickle).

    logp, idx = teacher_topk(teacher, params, rows[:, :-1], k=32)      # [N, T, k] float16, int32
    save_topk('topk.safetensors', rows, logp, idx); rows, logp, idx = load_topk('topk.safetensors')
    data = TopkBatches(rows, logp, idx, batch_size=16, seed=0)         # batches carry the cached targets
    fit(..., objective=cached_distillation(student, alpha=0.9), data=data)

The loss is KL(p_t || p_s) over the teacher's top-k tokens, with p_t renormalized over them and p_s the
student's full softmax (so mass the student puts elsewhere still costs).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.data import pipeline
from jaxcompress.train import losses
from jaxcompress.eval import token_nll
from jaxcompress.models import Model
from jaxcompress.train import objectives


def teacher_topk(teacher: Model, params, tokens: np.ndarray, k: int, *, batch: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
  """tokens [N, T] int -> (top-k log-probabilities [N, T, k] float16, their token ids [N, T, k] int32)."""
  v = teacher.config.vocab_size
  if not 1 <= k <= v:
    raise ValueError(f'teacher_topk: k={k} must lie in [1, {v}] (the vocabulary).')
  fn = jax.jit(lambda p, x: jax.lax.top_k(jax.nn.log_softmax(teacher.apply(p, x).astype(jnp.float32), -1), k))
  parts = [jax.device_get(fn(params, jnp.asarray(tokens[i:i + batch]))) for i in range(0, len(tokens), batch)]
  return (np.concatenate([p[0] for p in parts]).astype(np.float16),
          np.concatenate([p[1] for p in parts]).astype(np.int32))


def save_topk(path: str | os.PathLike, rows: np.ndarray, logp: np.ndarray, idx: np.ndarray) -> None:
  """rows [N, T + 1] with the top-k of positions 0..T-1 -> one safetensors file."""
  from safetensors.numpy import save_file
  save_file({'rows': np.ascontiguousarray(rows, np.int32), 'logp': np.ascontiguousarray(logp),
             'idx': np.ascontiguousarray(idx, np.int32)}, str(path))


def load_topk(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  from safetensors.numpy import load_file
  d = load_file(str(path))
  return d['rows'], d['logp'], d['idx']


def topk_kl(teacher_logp: jax.Array, teacher_idx: jax.Array, student_logits: jax.Array,
            temperature: float = 1.0) -> jax.Array:
  """KL over the teacher's top-k tokens. teacher_logp, teacher_idx: [..., k]; student_logits [..., V] -> [...]
  (T^2-scaled; the cached log-probabilities are divided by T before renormalizing)."""
  losses.check_temperature(temperature, 'topk_kl')
  t = jax.nn.log_softmax(teacher_logp.astype(jnp.float32) / temperature, -1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
  s_k = jnp.take_along_axis(s, teacher_idx, -1)
  return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s_k), -1)


@dataclasses.dataclass(frozen=True)
class TopkBatches:
  """`pipeline.LMBatches` over the cached rows, with each batch's cached top-k ('topk_logp', 'topk_idx')."""

  rows: np.ndarray  # [N, T + 1] int32
  logp: np.ndarray  # [N, T, k]
  idx: np.ndarray  # [N, T, k] int32
  batch_size: int
  seed: int

  def __post_init__(self):
    if self.logp.shape != self.idx.shape or self.logp.shape[:2] != (self.rows.shape[0], self.rows.shape[1] - 1):
      raise ValueError(f'TopkBatches: rows {self.rows.shape}, logp {self.logp.shape} and idx {self.idx.shape} '
                       'do not describe the same positions ([N, T + 1], [N, T, k], [N, T, k]).')
    object.__setattr__(self, '_lm', pipeline.LMBatches(sequences=self.rows, batch_size=self.batch_size,
                                                       seed=self.seed))

  @property
  def tokens_per_batch(self) -> int:
    return self._lm.tokens_per_batch

  def batch(self, step, *, process_index=0, process_count=1):
    sel = self._lm.rows(step, process_index=process_index, process_count=process_count)
    out = self._lm.batch(step, process_index=process_index, process_count=process_count)
    return {**out, 'topk_logp': self.logp[sel].astype(np.float32), 'topk_idx': self.idx[sel]}

  def fingerprint(self) -> str:
    return self._lm.fingerprint()


def cached_distillation(student: Model, *, alpha: float = 0.9, temperature: float = 1.0
                        ) -> objectives.Objective:
  """(1 - alpha) next-token NLL + alpha topk_kl against the cached teacher, summed over counted tokens;
  no teacher runs (frozen is unused). Metrics 'kd' and 'nll'."""
  losses.check_temperature(temperature, 'cached_distillation')

  def objective(params, frozen, batch, rng):
    del frozen, rng
    logits = student.apply(params, batch['inputs']).astype(jnp.float32)
    mask = objectives.token_mask(batch)
    kd = topk_kl(batch['topk_logp'], batch['topk_idx'], logits, temperature)
    nll = token_nll(logits, batch['targets'])
    loss = losses.mix(nll, kd, alpha) * mask
    return loss.sum(), (mask.sum(), {'kd': (kd * mask).sum(), 'nll': (nll * mask).sum()})

  return objective
