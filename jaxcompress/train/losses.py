"""Distillation losses: pure functions of teacher and student outputs, per position (the caller masks and sums).

Output matching (logits [..., V] -> [...] float32, nats):
  soft_kl          T^2 KL(p_t || p_s) of temperature-softened distributions (Hinton et al. 2015)
  reverse_kl       T^2 KL(p_s || p_t): mode-seeking, the student need not cover every teacher mode (MiniLLM,
                   Gu et al. 2024)
  generalized_jsd  beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s (GKD, Agarwal
                   et al. 2024); small beta behaves like forward KL, large beta like reverse KL
Intermediate matching ([B, T, ...] -> [B, T] float32):
  embedding_cosine 1 - cos of mean-pooled sentence embeddings (on each of the sequence's real tokens)
  hidden_mse       mean_d (h_s W - h_t)^2 through a learned projection W [D_s, D_t] (TinyBERT, Jiao et al. 2020)
  attention_mse    mean over heads and keys of (A_s - A_t)^2, attention probabilities [B, N, T, S] (TinyBERT)
  relation_kl      KL between the teacher's and student's self-relations softmax(x x^T / sqrt(d)) over R
                   relation heads, for x = queries, keys or values (MiniLM, Wang et al. 2020; with relation heads
                   as in MiniLMv2, so teacher and student widths and head counts may differ)
mix(task, distill, alpha) = alpha distill + (1 - alpha) task.

Every softmax and reduction runs in float32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxcompress import core


def check_temperature(temperature: float, where: str) -> None:
  if not temperature > 0:
    raise ValueError(f'{where}: temperature={temperature} must be positive (1 leaves the logits as they are; '
                     'Hinton et al. use 1 to 20).')


def _log_probs(teacher_logits, student_logits, temperature, where):
  check_temperature(temperature, where)
  if teacher_logits.shape != student_logits.shape:
    raise ValueError(f'{where}: teacher logits {tuple(teacher_logits.shape)} and student logits '
                     f'{tuple(student_logits.shape)} differ; teacher and student must share the vocabulary '
                     '(same tokenizer) and run on the same tokens.')
  t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return t, s


def soft_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """T^2 KL(softmax(teacher / T) || softmax(student / T)). [..., V] -> [...]. T^2 keeps the gradient's scale
  independent of T."""
  t, s = _log_probs(teacher_logits, student_logits, temperature, 'soft_kl')
  return temperature ** 2 * optax.losses.kl_divergence_with_log_targets(s, t)


def reverse_kl(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
  """T^2 KL(softmax(student / T) || softmax(teacher / T)). [..., V] -> [...]."""
  t, s = _log_probs(teacher_logits, student_logits, temperature, 'reverse_kl')
  return temperature ** 2 * optax.losses.kl_divergence_with_log_targets(t, s)


def generalized_jsd(teacher_logits: jax.Array, student_logits: jax.Array, beta: float = 0.5,
                    temperature: float = 1.0) -> jax.Array:
  """Generalized Jensen-Shannon divergence JSD(beta) of teacher and student, T^2-scaled. [..., V] -> [...].

  beta in (0, 1); at the limits it vanishes (use soft_kl for beta -> 0 and reverse_kl for beta -> 1, which
  are its shapes there up to the factor).
  """
  if not 0.0 < beta < 1.0:
    raise ValueError(f'generalized_jsd: beta={beta} must lie strictly between 0 and 1 (use soft_kl or '
                     'reverse_kl for the limits).')
  t, s = _log_probs(teacher_logits, student_logits, temperature, 'generalized_jsd')
  log_m = jnp.logaddexp(jnp.log(beta) + t, jnp.log1p(-beta) + s)
  kl_t = optax.losses.kl_divergence_with_log_targets(log_m, t)
  kl_s = optax.losses.kl_divergence_with_log_targets(log_m, s)
  return temperature ** 2 * (beta * kl_t + (1 - beta) * kl_s)


def hidden_mse(student_h: jax.Array, teacher_h: jax.Array, projection: core.Weight | None = None) -> jax.Array:
  """mean_d (student_h @ projection - teacher_h)^2. student_h [B, T, D_s], teacher_h [B, T, D_t],
  projection [D_s, D_t] (None when D_s == D_t) -> [B, T] float32."""
  s = student_h.astype(jnp.float32)
  if projection is not None:
    s = core.linear(s, projection)
  if s.shape != teacher_h.shape:
    raise ValueError(f'hidden_mse: projected student hidden states {tuple(s.shape)} and teacher hidden states '
                     f'{tuple(teacher_h.shape)} differ; give a projection [student width, teacher width].')
  return jnp.mean(jnp.square(s - teacher_h.astype(jnp.float32)), axis=-1)


def embedding_cosine(student_h: jax.Array, teacher_h: jax.Array, mask: jax.Array) -> jax.Array:
  """1 - cos(mean-pooled student, mean-pooled teacher) of each sequence, on each of its real tokens (so the
  per-token mean the objectives take is the length-weighted mean over sequences). student_h [B, T, D_s] (projected to D_t by the caller if
  the widths differ), teacher_h [B, T, D_t], mask [B, T] -> [B, T] float32."""
  if student_h.shape != teacher_h.shape:
    raise ValueError(f'embedding_cosine: student {tuple(student_h.shape)} and teacher {tuple(teacher_h.shape)} '
                     'hidden states differ; project the student to the teacher width first.')
  m = mask.astype(jnp.float32)
  count = jnp.maximum(m.sum(-1), 1.0)
  pool = lambda h: jnp.einsum('btd,bt->bd', h.astype(jnp.float32), m) / count[:, None]
  s, t = pool(student_h), pool(teacher_h)
  cos = jnp.sum(s * t, -1) / jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), 1e-12)
  return (1.0 - cos)[:, None] * m


def attention_mse(student_probs: jax.Array, teacher_probs: jax.Array) -> jax.Array:
  """Mean over heads and keys of the squared difference of attention probabilities.

  student_probs, teacher_probs: [B, N, T, S] (same head count N) -> [B, T] float32.
  """
  if student_probs.shape != teacher_probs.shape:
    raise ValueError(f'attention_mse: student attention {tuple(student_probs.shape)} and teacher attention '
                     f'{tuple(teacher_probs.shape)} differ; attention-map transfer needs the same head count '
                     '(use relation_kl, which regroups heads, otherwise).')
  d = jnp.square(student_probs.astype(jnp.float32) - teacher_probs.astype(jnp.float32))
  return jnp.mean(d, axis=(1, 3))


def self_relation(x: jax.Array, heads: int, key_valid: jax.Array | None = None) -> jax.Array:
  """Log of softmax(x_r x_r^T / sqrt(d_r)) per relation head r. x: [B, T, D] with D divisible by heads;
  key_valid: [B, T] (1 for real tokens) -> log-relations [B, heads, T, T] float32."""
  b, t, d = x.shape
  if d % heads:
    raise ValueError(f'self_relation: width {d} is not divisible by heads={heads}; choose a divisor of both '
                     'the teacher and the student width.')
  xr = x.astype(jnp.float32).reshape(b, t, heads, d // heads)
  scores = jnp.einsum('bqrh,bkrh->brqk', xr, xr) / jnp.sqrt(d // heads)
  if key_valid is not None:
    scores = jnp.where(key_valid[:, None, None, :].astype(bool), scores, -1e30)
  return jax.nn.log_softmax(scores, axis=-1)


def relation_kl(student_x: jax.Array, teacher_x: jax.Array, heads: int,
                key_valid: jax.Array | None = None) -> jax.Array:
  """KL(teacher relation || student relation), averaged over relation heads. student_x [B, T, D_s],
  teacher_x [B, T, D_t] (queries, keys or values of one layer); key_valid [B, T] -> [B, T] float32."""
  if student_x.shape[:2] != teacher_x.shape[:2]:
    raise ValueError(f'relation_kl: student {tuple(student_x.shape)} and teacher {tuple(teacher_x.shape)} must '
                     'share batch and sequence axes (the same tokens).')
  s = self_relation(student_x, heads, key_valid)
  t = self_relation(teacher_x, heads, key_valid)
  # Masked keys: both log-probabilities are about -1e30 - max, so p_t = 0 and they add nothing.
  kl = jnp.sum(jnp.where(t > -1e20, jnp.exp(t) * (t - s), 0.0), axis=-1)
  return jnp.mean(kl, axis=1)


def mix(task_loss: jax.Array, distill_loss: jax.Array, alpha: float) -> jax.Array:
  """alpha * distill_loss + (1 - alpha) * task_loss, alpha in [0, 1]."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'mix: alpha={alpha} must lie in [0, 1] (the weight of the distillation term).')
  return alpha * distill_loss + (1 - alpha) * task_loss
