"""Sequence-level knowledge distillation (Kim & Rush, "Sequence-Level Knowledge Distillation", EMNLP 2016): the
uncompressed model writes text from prompts of the training rows (`teacher_text`), and the compressed causal LM
trains on that text with the plain next-token loss.

    model, params = seq_kd(model, params, ctx, config=SeqKDConfig(steps=200, rows=256, prompt_len=8))
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import models, registry
from jaxcompress.data import pipeline
from jaxcompress.train import objectives, recovery


@dataclasses.dataclass(frozen=True, kw_only=True)
class SeqKDConfig:
  steps: int = registry.field(100, range='[1, inf)')  # optimizer steps on the teacher's text
  learning_rate: float = registry.field(1e-4, range='(0.0, inf)')  # peak learning rate (warm-up then cosine decay)
  rows: int = 256  # distinct sequences the uncompressed model samples (the batches cycle over them)
  prompt_len: int = 8  # tokens of a training row each sample starts from
  sample_temperature: float = 1.0  # the teacher's sampling temperature

  def __post_init__(self):
    for name in ('rows', 'prompt_len'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)} must be >= 1.')
    if not self.sample_temperature > 0:
      raise ValueError(f'sample_temperature={self.sample_temperature} must be > 0.')


def teacher_text(calib, config: SeqKDConfig, *, key: jax.Array | None = None) -> np.ndarray:
  """[config.rows, T + 1] int32 sequences calib.reference_model sampled from the first config.prompt_len tokens of
  rows of calib.train.sequences [N, T + 1] (rows drawn with `key`, default ctx.key('seq_kd'); KV-cache decoding
  at temperature config.sample_temperature, calib.train.batch_size prompts at a time)."""
  ctx = registry.as_context(calib)
  teacher, teacher_params = ctx.teacher('seq_kd')
  seqs = np.asarray(ctx.needs_train('seq_kd').sequences)
  t = seqs.shape[1]
  if config.prompt_len >= t:
    raise ValueError(f'seq_kd: prompt_len={config.prompt_len} leaves nothing to sample in rows of {t} tokens; '
                     f'choose prompt_len < {t}.')
  key = ctx.key('seq_kd') if key is None else key
  pick, sample = jax.random.split(key)
  rows = np.asarray(jax.random.choice(pick, len(seqs), (config.rows,), replace=len(seqs) < config.rows))
  prompts = jnp.asarray(seqs[rows, :config.prompt_len], jnp.int32)
  out, step = [], ctx.train.batch_size
  for i in range(0, config.rows, step):
    out.append(np.asarray(models.generate(teacher, teacher_params, prompts[i:i + step],
                                          max_new_tokens=t - config.prompt_len,
                                          temperature=config.sample_temperature, key=jax.random.fold_in(sample, i))))
  return np.concatenate(out).astype(np.int32)


def seq_kd(model, params, calib, *, config: SeqKDConfig = SeqKDConfig(), key: jax.Array | None = None):
  """(model, params trained for config.steps with the next-token loss on `teacher_text(calib, config, key=key)`,
  batched as calib.train and shuffled with calib.seed). A causal LM with causal-LM training rows only."""
  ctx = registry.as_context(calib)
  if not model.causal or not hasattr(ctx.train, 'sequences'):
    raise ValueError('seq_kd trains a causal LM on text its teacher samples; it needs causal-LM training rows.')
  text = pipeline.LMBatches(sequences=teacher_text(ctx, config, key=key), batch_size=ctx.train.batch_size,
                            seed=ctx.seed)
  ctx = dataclasses.replace(ctx, train=text)
  return model, recovery.fit(ctx, 'seq_kd', model, params, objectives.causal_lm(model), steps=config.steps,
                             learning_rate=config.learning_rate, teacher=False)


registry.register('seq_kd', SeqKDConfig, seq_kd, family='distillation', trains=True,
                  paper='Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016)')
