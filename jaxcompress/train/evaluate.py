"""Held-out evaluation during training: mean next-token loss over packed validation sequences, sharded over
the training mesh and scored by eval.lm.sequence_nll (the path every perplexity takes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.eval import lm
from jaxcompress.models import Model, ids, layers
from jaxcompress.train import sharding as sharding_lib


def make_lm_eval(model: Model, sequences: np.ndarray, *, batch_size: int, mesh: jax.sharding.Mesh,
                 compute_dtype: Any = jnp.float32, prefix: str = 'valid/') -> Callable[[Any], dict[str, float]]:
  """fn(params) -> {'valid/loss', 'valid/perplexity', 'valid/tokens'} over every token of `sequences`.

  sequences: [N, T + 1] int32 packed token rows (inputs are [:, :-1], targets [:, 1:]). Every process passes
  the same array; each feeds its own rows of every batch. The last batch is padded and masked.
  """
  sequences = np.asarray(sequences)
  if sequences.ndim != 2 or sequences.shape[1] < 2:
    raise ValueError(f'make_lm_eval: sequences must be [N, T + 1] with T >= 1, got {sequences.shape}.')
  ids.check_tokens(model, sequences, name='sequences', where='make_lm_eval: ')  # once: the rows are fixed
  sequences = sequences.astype(np.int32)
  divisor = sharding_lib.batch_divisor(mesh)
  if batch_size % divisor:
    raise ValueError(f'make_lm_eval: batch_size={batch_size} must be a multiple of {divisor} (data x fsdp).')
  @jax.jit
  def batch_nll(params, batch):
    params = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                          params)
    with layers.activation_sharding(sharding_lib.batch_sharding(mesh)):
      nll, count = lm.sequence_nll(model, params, batch['inputs'], batch['targets'], batch['mask'])
    return nll.sum(), count.sum()

  n = len(sequences)
  pad = (-n) % batch_size
  rows = np.concatenate([sequences, np.zeros((pad, sequences.shape[1]), np.int32)])
  valid = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  p, count = jax.process_index(), jax.process_count()
  local = batch_size // count

  def evaluate(params) -> dict[str, float]:
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
      mine = slice(start + p * local, start + (p + 1) * local)
      chunk = rows[mine]
      mask = np.broadcast_to(valid[mine, None], (local, chunk.shape[1] - 1)).astype(np.float32)
      batch = sharding_lib.global_batch({'inputs': chunk[:, :-1], 'targets': chunk[:, 1:], 'mask': mask}, mesh)
      # Read back before the next batch: several collective programs in flight at once can starve the CPU
      # backend's rendezvous (virtual devices share one thread pool).
      t, c = batch_nll(params, batch)
      total, tokens = total + float(t), tokens + int(c)
    result = lm.PerplexityResult(nll=total, count=tokens)
    return {f'{prefix}loss': result.mean_nll, f'{prefix}perplexity': result.perplexity,
            f'{prefix}tokens': float(result.count)}

  return evaluate
