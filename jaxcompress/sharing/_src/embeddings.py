"""Tied input and output embeddings (Press & Wolf, "Using the Output Embedding to Improve Language Models",
EACL 2017): an untied causal LM's head K [D, V] and input table E [V, D] become one table, the head reading Eᵀ.

    tied_model, tied = sharing.tie_embeddings(model, params)                          # E = (E + Kᵀ) / 2
    tied_model, tied = sharing.tie_embeddings(model, params, config=sharing.TieConfig(how='embedding'))  # keep E
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax.numpy as jnp

from jaxcompress import core, registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class TieConfig:
  how: str = 'average'  # 'average' of the input table and the head, or 'embedding' (keep the input table)


def tie_embeddings(model: Any, params: dict, calib: Any = None, *,
                   config: TieConfig = TieConfig()) -> tuple[Any, dict]:
  """(model with tied input/output embeddings, params without the separate head) for an untied causal LM.

  config.how: 'average' (embedding = (E + Kᵀ) / 2, E [V, D] the input table, K [D, V] the head) or 'embedding'
  (keep E). The model's config must have a `tie_embeddings` flag (Llama, Mistral, Qwen2); the tied head is Eᵀ.
  calib is not used (no data needed).
  """
  how = config.how
  cfg = getattr(model, 'config', None)
  if cfg is None or not hasattr(cfg, 'tie_embeddings'):
    raise ValueError(f'tie_embeddings: {type(model).__name__} has no tie_embeddings config flag.')
  if cfg.tie_embeddings:
    raise ValueError('tie_embeddings: the model is already tied.')
  if how not in ('average', 'embedding'):
    raise ValueError(f"tie_embeddings: how={how!r}; choose 'average' or 'embedding'.")
  flat = core.flatten(core.resolve(params))
  emb_path = next(p for p in flat if p.endswith('embedding') and p.startswith('embed'))
  head = next((p for p in flat if re.match(model.head_patterns[0], p) and p.endswith('kernel')), None)
  if head is None:
    raise KeyError(f'tie_embeddings: no head kernel matching {model.head_patterns[0]!r}.')
  emb = jnp.asarray(core.materialize(flat[emb_path]))
  if how == 'average':
    emb = ((emb + jnp.asarray(core.materialize(flat[head])).T) / 2).astype(emb.dtype)
  tied = type(model)(dataclasses.replace(cfg, tie_embeddings=True))
  head_key = head.split('/')[0]
  out = {k: v for k, v in params.items() if k != head_key}
  return tied, core.paths.replace(out, {emb_path: emb})


registry.register('tie_embeddings', TieConfig, tie_embeddings, family='sharing', forbids=registry.COMPRESSED,
                  adds='shared', paper='Press & Wolf, "Using the Output Embedding to Improve Language Models" '
                  '(EACL 2017)')
