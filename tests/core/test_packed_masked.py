"""`core.masked.compact`: the packed inference form of Masked weights equals them, multiplies like them, saves
and loads, and takes fewer bytes than dense."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress import core
from jaxcompress.core import masked, serialize


def _masked(seed: int, shape=(37, 24), keep=0.5, mask_shape=None) -> core.Masked:
  rng = np.random.default_rng(seed)
  value = rng.normal(size=shape).astype(np.float32)
  mask = rng.uniform(size=mask_shape or shape) < keep
  return core.Masked(jnp.asarray(value), jnp.asarray(mask))


def test_compact_equals_masked_and_saves_memory(tmp_path):
  params = {'a': {'kernel': _masked(0)}, 'b': {'kernel': _masked(1, mask_shape=(1, 24))},
            'empty': {'kernel': _masked(2, keep=0.0)}, 'dense': {'scale': jnp.ones(24)}}
  packed = masked.compact(params)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 37)), jnp.float32)
  for name in ('a', 'b', 'empty'):
    w, p = params[name]['kernel'], packed[name]['kernel']
    assert isinstance(p, core.PackedMasked) and p.kept() == w.kept()
    ref = np.where(np.broadcast_to(np.asarray(w.mask), w.shape), np.asarray(w.value), 0.0)
    np.testing.assert_array_equal(np.asarray(p.materialize()), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(core.linear)(x, p)), np.asarray(core.linear(x, w)))
    assert core.memory_bytes(p) == 4 * w.kept() + -(-w.size // 8) < 4 * w.size
  assert packed['dense']['scale'] is params['dense']['scale']
  serialize.save(tmp_path / 'p.safetensors', packed)
  loaded = serialize.load(tmp_path / 'p.safetensors')
  for name in ('a', 'b', 'empty'):
    np.testing.assert_array_equal(np.asarray(loaded[name]['kernel'].materialize()),
                                  np.asarray(packed[name]['kernel'].materialize()))
  assert core.stats.totals(packed).memory < core.stats.totals(params).memory
