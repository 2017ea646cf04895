"""LoRA adapters: W x + scale * (x a) b with the base W held fixed and only the factors a, b trained."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress import core
from jaxcompress.train import state as state_lib

# The `trainable` predicate for the training step: only the adapters' factors are updated.
LORA_TRAINABLE = state_lib.matching(r'/lora_(a|b)$')


def add_lora(params: Any, key: jax.Array, *, rank: int = 8, alpha: float = 16.0,
             rules: core.Rules = core.Rules()) -> Any:
  """Selected kernels become `LoRA(base, a, b)` with a ~ N(0, 1/in), b = 0, so the model is unchanged at first.

  a: [in, rank] float32, b: [rank, out] float32, scale = alpha / rank. Train with trainable=LORA_TRAINABLE.
  """
  if rank < 1:
    raise ValueError(f'add_lora: rank={rank} must be >= 1.')
  sel = core.select_by(params, rules)
  keys = dict(zip(sel.paths, jax.random.split(key, max(len(sel), 1))))

  def adapt(path, w):
    d_in, d_out = core.shape_of(w)
    a = jax.random.normal(keys[path], (d_in, rank), jnp.float32) / jnp.sqrt(d_in)
    return core.LoRA(base=w, lora_a=a, lora_b=jnp.zeros((rank, d_out), jnp.float32), scale=alpha / rank)

  return sel.map(adapt, params)
