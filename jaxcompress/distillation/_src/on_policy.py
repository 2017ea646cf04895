"""On-policy distillation (GKD, Agarwal et al., "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", 2024): with probability lambda a batch's continuations are sampled from the STUDENT
itself (its current params, KV-cache decoding), and the teacher grades those tokens with the generalized JSD.

    policy = OnPolicyConfig(fraction=0.5, prompt_len=8, temperature=1.0)
    objective = on_policy_distillation(student, teacher, DistillConfig(output='jsd', beta=0.5, alpha=1.0), policy)
    fit(..., objective=objective, frozen=teacher_params)

The recipe method `gkd` trains a compressed causal LM this way against the uncompressed model:

    model, params = gkd(model, params, ctx, config=GKDConfig(steps=200, fraction=0.5, prompt_len=8))

Everything runs inside the jitted step: the coin and the samples come from the objective's rng (the run seed
folded with the step and micro-batch), the generation reads the params the step differentiates (under
stop_gradient: the sampled ids are integers, no gradient flows through the sampling), and `lax.cond` runs only
the branch drawn. fraction=0 is supervised KD on the data; fraction=1 is purely on-policy.

A sampled batch keeps each data row's first `prompt_len` tokens and replaces the rest by the student's
continuation; only positions that predict a sampled token count (the prompt's do not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcompress import registry
from jaxcompress.models import Model, generate
from jaxcompress.train import kd, losses, objectives, recovery


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnPolicyConfig:
  fraction: float = 0.5  # lambda: probability that a batch's continuations are sampled from the student
  prompt_len: int = 8  # tokens of each data row kept as the prompt; the student writes the rest
  temperature: float = 1.0  # sampling temperature of the student (> 0: GKD samples, it does not decode greedily)
  top_k: int | None = None  # sample among the student's top_k tokens only (None: the whole vocabulary)

  def __post_init__(self):
    if not 0.0 <= self.fraction <= 1.0:
      raise ValueError(f'OnPolicyConfig: fraction={self.fraction} must lie in [0, 1] (the share of batches '
                       'sampled from the student).')
    if self.prompt_len < 1:
      raise ValueError(f'OnPolicyConfig: prompt_len={self.prompt_len} must be >= 1 (generation needs a prompt).')
    losses.check_temperature(self.temperature, 'OnPolicyConfig')
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f'OnPolicyConfig: top_k={self.top_k} must be >= 1 or None.')


def student_batch(student: Model, params: dict, batch: dict, key: jax.Array, policy: OnPolicyConfig) -> dict:
  """The batch with each row's continuation sampled from the student.

  batch: inputs, targets [B, T] int32 (targets = inputs shifted by one). params: the student's (PROJ dropped).
  Returns inputs, targets [B, T] int32 over the sequence prompt + sample (prompt = inputs[:, :prompt_len],
  sample = T + 1 - prompt_len tokens from `models.generate` with `key`) and mask [B, T] float32, 1 where the
  target is a sampled token (positions prompt_len - 1 ... T - 1).
  """
  b, t = batch['inputs'].shape
  if policy.prompt_len >= t:
    raise ValueError(f'on_policy_distillation: prompt_len={policy.prompt_len} leaves nothing to sample in rows of '
                     f'{t} input tokens; choose prompt_len < {t}.')
  prompt = batch['inputs'][:, :policy.prompt_len].astype(jnp.int32)
  seq = generate(student, jax.lax.stop_gradient(params), prompt, max_new_tokens=t + 1 - policy.prompt_len,
                 temperature=policy.temperature, top_k=policy.top_k, key=key)
  mask = (jnp.arange(t) >= policy.prompt_len - 1).astype(jnp.float32)
  return {'inputs': seq[:, :-1], 'targets': seq[:, 1:], 'mask': jnp.broadcast_to(mask, (b, t))}


def split_key(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(coin key, sampling key) of one objective call's rng."""
  coin, sample = jax.random.split(rng)
  return coin, sample


def on_policy_distillation(student: Model, teacher: Model, cfg: kd.DistillConfig, policy: OnPolicyConfig, *,
                           remat: bool = False) -> objectives.Objective:
  """Objective for `train.loop.fit` (teacher params as `frozen`): `kd.distillation(student, teacher, cfg)` on
  a batch that is, with probability policy.fraction, re-sampled from the current student (`student_batch`),
  else the data batch. The coin is uniform(coin key) < fraction, the samples use the sampling key
  (`split_key(rng)`). Metric 'on_policy': the weight of the sampled batches (per token after the step: the
  share of counted tokens that came from the student).

  Sampled tokens have no reference next token, so cfg.alpha must be 1 (divergence only, as GKD) when any batch
  is sampled; cfg.output must compare logits ('jsd' for GKD; 'soft_kl' and 'reverse_kl' also work).
  """
  if cfg.output not in ('soft_kl', 'reverse_kl', 'jsd'):
    raise ValueError(f'on_policy_distillation: output={cfg.output!r}; on-policy samples are graded by a logit '
                     "divergence: use 'jsd' (GKD), 'soft_kl' or 'reverse_kl'.")
  if policy.fraction > 0 and cfg.alpha != 1.0:
    raise ValueError(f'on_policy_distillation: alpha={cfg.alpha} mixes in the next-token loss, whose targets on '
                     'student-sampled tokens are the student\'s own samples; use alpha=1 (divergence only).')
  base = kd.distillation(student, teacher, cfg, remat=remat)

  def objective(params, frozen, batch, rng):
    if rng is None:
      raise ValueError('on_policy_distillation needs the step rng (it draws the coin and the samples).')
    data = {'inputs': batch['inputs'], 'targets': batch['targets'], 'mask': objectives.token_mask(batch)}
    coin, key = split_key(rng)
    sp, _ = kd.split_params(params)
    sample = lambda: student_batch(student, sp, data, key, policy)
    if policy.fraction == 1.0:
      used, on = sample(), jnp.float32(1)
    elif policy.fraction == 0.0:
      used, on = data, jnp.float32(0)
    else:
      draw = jax.random.uniform(coin) < policy.fraction
      used, on = jax.lax.cond(draw, sample, lambda: data), draw.astype(jnp.float32)
    loss, (weight, metrics) = base(params, frozen, used, None)
    return loss, (weight, {**metrics, 'on_policy': on * weight})

  return objective


@dataclasses.dataclass(frozen=True, kw_only=True)
class GKDConfig:
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  fraction: float = 0.5  # lambda: probability that a batch's continuations are sampled from the student
  divergence: str = 'jsd'  # 'jsd' (generalized JSD, GKD), 'soft_kl' (forward KL) or 'reverse_kl'
  beta: float = 0.5  # the JSD's beta, in (0, 1): towards 0 forward KL, towards 1 reverse KL
  temperature: float = 1.0  # softening of both distributions in the divergence
  sample_temperature: float = 1.0  # the student's sampling temperature
  prompt_len: int = 8  # tokens of each data row kept as the prompt; the student writes the rest
  top_k: int | None = None  # sample among the student's top_k tokens only (None: the whole vocabulary)

  def __post_init__(self):  # the objective's own checks, at parse time
    OnPolicyConfig(fraction=self.fraction, prompt_len=self.prompt_len, temperature=self.sample_temperature,
                   top_k=self.top_k)
    if self.divergence not in ('jsd', 'soft_kl', 'reverse_kl'):
      raise ValueError(f"divergence={self.divergence!r}; choose 'jsd', 'soft_kl' or 'reverse_kl'.")
    kd.DistillConfig(output=self.divergence, beta=self.beta, temperature=self.temperature, alpha=1.0)


def gkd(model, params, calib, *, config: GKDConfig = GKDConfig()):
  """(model, params fine-tuned for config.steps on calib.train by `on_policy_distillation` from
  calib.reference_model): a causal LM only. The coins and samples derive from the run seed (the step rng)."""
  ctx = registry.as_context(calib)
  if not model.causal:
    raise ValueError('gkd samples continuations from a causal LM; for an encoder use distill.')
  dcfg = kd.DistillConfig(output=config.divergence, beta=config.beta, temperature=config.temperature, alpha=1.0)
  policy = OnPolicyConfig(fraction=config.fraction, prompt_len=config.prompt_len,
                          temperature=config.sample_temperature, top_k=config.top_k)
  teacher, _ = ctx.teacher('gkd')
  objective = on_policy_distillation(model, teacher, dcfg, policy)
  return model, recovery.fit(ctx, 'gkd', model, params, objective, steps=config.steps,
                             learning_rate=config.learning_rate)


registry.register('gkd', GKDConfig, gkd, family='distillation', trains=True,
                  paper='Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated '
                  'Mistakes" (ICLR 2024)')
