"""Recovery fine-tuning of a compressed model: knowledge distillation from the uncompressed model (`distill`,
Hinton et al. 2015, with TinyBERT's hidden-state / attention terms and MiniLM's relations as options) or the task
loss alone (`recover`: the same function with kd_weight=0).

    model, params = distill(model, params, ctx, config=RecoverConfig(steps=500, hidden_weight=1.0))

`ctx` is a `registry.Context` with training batches (`train`) and the uncompressed model as teacher
(`reference_model`, `reference`).
"""

from __future__ import annotations

import dataclasses

from jaxcompress import registry
from jaxcompress.train import kd, recovery


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecoverConfig:
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  output: str | None = None  # KD output term: None picks 'soft_kl' for causal LMs, 'embedding' for encoders
  temperature: float = 2.0  # softening of both distributions in the logit terms
  kd_weight: float = 0.5  # weight of KD against the task loss (causal LMs; encoders use KD alone)
  beta: float = 0.5  # generalized JSD's beta for output='jsd' (GKD on the data)
  hidden_weight: float = 0.0  # TinyBERT: weight of the hidden-state MSE over layer_map
  attention_weight: float = 0.0  # TinyBERT: weight of the attention-map MSE over layer_map
  relation_weight: float = 0.0  # MiniLM: weight of the last block's Q-Q, K-K, V-V relation KL
  relation_heads: int = 1  # MiniLM: relation heads the Q/K/V widths are split into
  layer_map: tuple[tuple[int, int], ...] = ()  # (student, teacher) hidden-state layers; (): TinyBERT's uniform map

  def __post_init__(self):  # the KD objective's own checks of these values, at parse time
    kd.DistillConfig(output=self.output or 'soft_kl', temperature=self.temperature, alpha=self.kd_weight,
                     beta=self.beta, hidden_weight=self.hidden_weight, attention_weight=self.attention_weight,
                     relation_weight=self.relation_weight, relation_heads=self.relation_heads,
                     layer_map=self.layer_map)


def distill(model, params, calib, *, config: RecoverConfig = RecoverConfig()):
  """(model, params fine-tuned for config.steps on calib.train): KD from calib.reference_model mixed with the task
  loss by config.kd_weight (causal LMs; an encoder distils alone). Registered as `distill` and as `recover`
  (kd_weight=0: the task loss only)."""
  ctx = registry.as_context(calib)
  objective = recovery.kd_objective(
      model, ctx, output=config.output, temperature=config.temperature, alpha=config.kd_weight, beta=config.beta,
      hidden_weight=config.hidden_weight, attention_weight=config.attention_weight,
      relation_weight=config.relation_weight, relation_heads=config.relation_heads, layer_map=config.layer_map)
  return model, recovery.fit(ctx, 'distill', model, params, objective, steps=config.steps,
                             learning_rate=config.learning_rate)


def recover(model, params, calib, *, config: RecoverConfig = RecoverConfig(kd_weight=0.0)):
  """`distill` with the task loss alone by default (kd_weight=0), as the recipe name `recover` runs it."""
  return distill(model, params, calib, config=config)


registry.register('distill', RecoverConfig, distill, family='distillation', trains=True,
                  paper='Hinton et al., "Distilling the Knowledge in a Neural Network" (2015): recovery fine-tuning '
                  'with KD from the uncompressed model')
registry.register('recover', RecoverConfig, distill, family='distillation', trains=True, defaults={'kd_weight': 0.0},
                  paper='task-loss fine-tuning of the compressed model (kd_weight=0: no KD term; encoders always use KD)')
