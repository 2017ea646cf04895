"""Distillation objectives for `train.loop.fit`, the teacher's params in `TrainState.frozen`.

`logit_distillation`: the student matches the teacher's temperature-softened next-token distribution,

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

(T^2 keeps the soft term's gradient on the scale of the hard one as T changes). `distillation` generalizes it
with a `DistillConfig`: any output term of `losses`, hidden-state, attention and Q/K/V-relation terms over a
layer map, and learned projections trained with the student under params[PROJ].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from jaxcompress import core
from jaxcompress.train import losses
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
    objectives.require(batch, ('inputs', 'targets'), 'logit_distillation')
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


# General objective: output, intermediate and relation terms ----------------------------------------------------

PROJ = 'distill_proj'  # params key of the learned student -> teacher projections (dropped before the model runs)
OUTPUTS = ('soft_kl', 'reverse_kl', 'jsd', 'hidden', 'embedding', 'none')


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig:
  # output term: 'soft_kl', 'reverse_kl', 'jsd' (logits); 'hidden' (encoder output MSE), 'embedding' (1 - cosine
  # of mean-pooled encoder outputs plus their MSE); 'none'
  output: str = 'soft_kl'
  temperature: float = 2.0  # softening of both distributions in the logit terms
  beta: float = 0.5  # GKD's beta for output='jsd'
  alpha: float = 0.5  # weight of the distillation terms against the task loss (causal LM next-token NLL)
  layer_map: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) pairs of hidden states (0: embeddings)
  hidden_weight: float = 0.0  # weight of hidden-state MSE over layer_map (through learned projections)
  attention_weight: float = 0.0  # weight of attention-map MSE over layer_map (layer i: block i's attention, i >= 1)
  relation_weight: float = 0.0  # weight of last-layer Q-Q, K-K, V-V relation KL (MiniLM)
  relation_heads: int = 1  # relation heads the Q/K/V widths are split into (must divide both models' widths)

  def __post_init__(self):
    if self.output not in OUTPUTS:
      raise ValueError(f'DistillConfig: output={self.output!r}; choose from {OUTPUTS}.')
    losses.check_temperature(self.temperature, 'DistillConfig')
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f'DistillConfig: alpha={self.alpha} must lie in [0, 1].')
    if self.output == 'jsd' and not 0.0 < self.beta < 1.0:
      raise ValueError(f'DistillConfig: beta={self.beta} must lie strictly between 0 and 1.')
    for name in ('hidden_weight', 'attention_weight', 'relation_weight'):
      if getattr(self, name) < 0:
        raise ValueError(f'DistillConfig: {name}={getattr(self, name)} must be >= 0.')
    if self.relation_heads < 1:
      raise ValueError(f'DistillConfig: relation_heads={self.relation_heads} must be >= 1.')


def check_pair(student: Model, teacher: Model, cfg: DistillConfig) -> None:
  """Refuses teacher/student pairs the configured terms cannot compare, naming what differs."""
  sv, tv = (getattr(m.config, 'vocab_size', None) for m in (student, teacher))
  if cfg.output in ('soft_kl', 'reverse_kl', 'jsd') and sv != tv:
    raise ValueError(f'distillation: student vocab_size={sv} and teacher vocab_size={tv} differ; logit '
                     'distillation needs one tokenizer for both (or use output="hidden" / "none").')
  if cfg.output in ('soft_kl', 'reverse_kl', 'jsd') and not student.causal:
    raise ValueError(f'distillation: output={cfg.output!r} compares logits, but the student is an encoder '
                     'whose output is hidden states; use output="hidden".')
  if cfg.output in ('hidden', 'embedding') and student.causal:
    raise ValueError(f'distillation: output="{cfg.output}" compares encoder outputs (hidden states), but the student is '
                     'a causal LM whose output is logits; use "soft_kl", "reverse_kl" or "jsd".')
  if not student.causal and cfg.alpha != 1.0:
    raise ValueError(f'distillation: alpha={cfg.alpha} mixes in a next-token task loss, which an encoder '
                     'student has not; use alpha=1.')
  for s, t in cfg.layer_map:
    for who, i, m in (('student', s, student), ('teacher', t, teacher)):
      n = m.config.num_layers
      if not 0 <= i <= n:
        raise ValueError(f'distillation: layer_map pair ({s}, {t}) names {who} layer {i}, but the {who} has '
                         f'{n} layers (hidden states 0..{n}, 0 being the embeddings).')
      if cfg.attention_weight and i == 0:
        raise ValueError(f'distillation: layer_map pair ({s}, {t}) maps the embeddings, which have no attention; '
                         'attention transfer needs layers >= 1.')


def init_projections(student: Model, teacher: Model, cfg: DistillConfig, key: jax.Array) -> dict:
  """{'<k>': kernel [D_s, D_t]} for each layer_map pair k (and 'out' for output='hidden') whose widths differ,
  initialized to a scaled random matrix. Add them to the student params as params[PROJ]."""
  ds, dt = student.config.hidden_size, teacher.config.hidden_size
  if ds == dt:
    return {}
  names = [str(k) for k in range(len(cfg.layer_map))] if cfg.hidden_weight else []
  names += ['out'] if cfg.output in ('hidden', 'embedding') else []
  keys = jax.random.split(key, max(len(names), 1))
  return {n: {'kernel': jax.random.normal(k, (ds, dt), jnp.float32) / ds ** 0.5} for n, k in zip(names, keys)}


def split_params(params: dict) -> tuple[dict, dict]:
  """(student params, projections): the model never sees params[PROJ]."""
  return {k: v for k, v in params.items() if k != PROJ}, params.get(PROJ, {})


def _proj(projections: dict, name: str):
  return projections[name]['kernel'] if name in projections else None


def last_layer_qkv(model: Model, params: dict, h_in: jax.Array, tokens: jax.Array,
                   attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Queries, keys and values ([B, T, width], before rotary positions) of the last block, recomputed from its
  input h_in [B, T, D] through its own q/k/v kernels (the inputs the block feeds them, normed or not)."""
  i = model.num_layers(params) - 1
  bp = model.block_params(params, i)
  ctx = model.context(tokens, attention_mask=attention_mask)
  _, inputs = model.block_linear_inputs(bp, h_in, ctx)
  flat = core.paths.flatten(core.resolve(bp))
  out = []
  for p in ('q', 'k', 'v'):
    kernel = f'attn/{p}_proj/kernel'
    out.append(core.linear(inputs[kernel].astype(jnp.float32), flat[kernel], flat.get(f'attn/{p}_proj/bias')))
  return tuple(out)


def distillation(student: Model, teacher: Model, cfg: DistillConfig, *, remat: bool = False
                 ) -> objectives.Objective:
  """Objective for `train.loop.fit` with the teacher's params as `frozen` (see `prepare_teacher`):

      loss = (1 - alpha) task + alpha (output term + hidden_weight hidden + attention_weight attention
                                       + relation_weight relation)

  summed over counted tokens. Batches: inputs [B, T] int32 with targets (causal LM) or attention_mask
  (encoder). Learned projections live in params[PROJ] (`init_projections`) and are trained with the student;
  `split_params` separates them afterwards. Metrics: each term's sum.
  """
  check_pair(student, teacher, cfg)
  want = tuple(n for n, on in (('hidden_states', cfg.hidden_weight or cfg.relation_weight),
                               ('attention', cfg.attention_weight)) if on)

  def run(model, p, batch, remat_):
    out = model.apply(p, batch['inputs'], attention_mask=batch.get('attention_mask'), remat=remat_,
                      intermediates=want)
    return out if want else (out, {})

  def objective(params, frozen, batch, rng):
    del rng
    if frozen is None:
      raise ValueError('distillation needs the teacher params as TrainState.frozen (fit(frozen=...)).')
    objectives.require(batch, ('inputs', 'targets') if student.causal else ('inputs',), 'distillation')
    sp, projections = split_params(params)
    s_out, s_int = run(student, sp, batch, remat)
    t_out, t_int = jax.lax.stop_gradient(run(teacher, frozen, batch, False))
    if student.causal:
      mask = objectives.token_mask(batch)
    else:
      mask = batch['attention_mask'].astype(jnp.float32) if 'attention_mask' in batch else (
          jnp.ones(batch['inputs'].shape, jnp.float32))
    terms = {}
    if cfg.output == 'soft_kl':
      terms['kd'] = losses.soft_kl(t_out, s_out, cfg.temperature)
    elif cfg.output == 'reverse_kl':
      terms['kd'] = losses.reverse_kl(t_out, s_out, cfg.temperature)
    elif cfg.output == 'jsd':
      terms['kd'] = losses.generalized_jsd(t_out, s_out, cfg.beta, cfg.temperature)
    elif cfg.output == 'hidden':
      terms['kd'] = losses.hidden_mse(s_out, t_out, _proj(projections, 'out'))
    elif cfg.output == 'embedding':
      p = _proj(projections, 'out')
      s_proj = s_out.astype(jnp.float32) if p is None else core.linear(s_out.astype(jnp.float32), p)
      terms['kd'] = losses.embedding_cosine(s_proj, t_out, mask) + losses.hidden_mse(s_proj, t_out)
    distill = sum(terms.values()) if terms else jnp.zeros(mask.shape, jnp.float32)
    if cfg.hidden_weight:
      h = sum(losses.hidden_mse(s_int['hidden_states'][s], t_int['hidden_states'][t], _proj(projections, str(k)))
              for k, (s, t) in enumerate(cfg.layer_map)) / max(len(cfg.layer_map), 1)
      terms['hidden'] = h
      distill = distill + cfg.hidden_weight * h
    if cfg.attention_weight:
      a = sum(losses.attention_mse(s_int['attention'][s - 1], t_int['attention'][t - 1])
              for s, t in cfg.layer_map) / max(len(cfg.layer_map), 1)
      terms['attention'] = a
      distill = distill + cfg.attention_weight * a
    if cfg.relation_weight:
      am = batch.get('attention_mask')
      s_qkv = last_layer_qkv(student, sp, s_int['hidden_states'][-2], batch['inputs'], am)
      t_qkv = jax.lax.stop_gradient(last_layer_qkv(teacher, frozen, t_int['hidden_states'][-2], batch['inputs'], am))
      r = sum(losses.relation_kl(s, t, cfg.relation_heads, am) for s, t in zip(s_qkv, t_qkv)) / 3
      terms['relation'] = r
      distill = distill + cfg.relation_weight * r
    if student.causal:
      nll = token_nll(s_out.astype(jnp.float32), batch['targets'])
      terms['nll'] = nll
      loss = losses.mix(nll, distill, cfg.alpha)
    else:
      loss = distill
    metrics = {k: (v * mask).sum() for k, v in terms.items()}
    return (loss * mask).sum(), (mask.sum(), metrics)

  return objective


def prepare_teacher(teacher: Model, params: dict, storage: str = 'float32') -> dict:
  """The teacher's params as held in `TrainState.frozen`: 'float32' as given, 'bfloat16' (every floating array
  cast, half the memory) or 'int8' (kernels round-to-nearest 8-bit per output channel, a quarter)."""
  if storage == 'float32':
    return params
  if storage == 'bfloat16':
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  if storage == 'int8':
    return teacher.select(params).map(lambda _, w: core.quantize(w, bits=8, group_size=None, symmetric=True),
                                      params)
  raise ValueError(f"prepare_teacher: storage={storage!r}; choose 'float32', 'bfloat16' or 'int8'.")
