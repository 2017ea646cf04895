"""A leaf kind defined only here, outside core, goes through serialization, accounting, export and sharding.

`Scaled(base, scale)` is W = base · diag(scale): any weight (dense or compressed) times one float per output
column. It registers its on-disk format with `core.serialize.register`; nothing in core names it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, models
from jaxcompress.core import leaf as leaf_lib
from jaxcompress.core import serialize, stats
from tests import xla_settings

REPO = pathlib.Path(__file__).resolve().parents[2]
IN, OUT = 16, 32


@leaf_lib.leaf_type
@dataclasses.dataclass(frozen=True)
class Scaled(core.Compressed):
  """W = base * scale. base: [in, out] weight (dense or compressed); scale: [1, out] float."""

  base: Any
  scale: Any

  @property
  def shape(self):
    return core.shape_of(self.base)

  @property
  def dtype(self):
    return np.dtype(self.scale.dtype)

  def materialize(self):
    return (core.materialize(self.base).astype(jnp.float32) * self.scale).astype(self.dtype)

  def matmul(self, x):
    return core.linear(x, self.base) * self.scale.astype(x.dtype)  # scale the outputs, never form W

  def stored_params(self):
    return core.stored_params(self.base) + int(np.size(self.scale))

  def memory_bytes(self):
    return core.memory_bytes(self.base) + core.memory_bytes(self.scale)

  def disk_bytes(self):
    return core.disk_bytes(self.base) + core.memory_bytes(self.scale)

  def matmul_flops(self):
    return core.matmul_flops(self.base) + self.shape[1]


def _encode(w: Scaled, out: serialize.Writer) -> dict:
  out.put('.scale', w.scale)
  return {'base': out.weight('.base', w.base)}


def _decode(desc: dict, src: serialize.Reader) -> Scaled:
  return Scaled(base=src.weight('.base', desc['base']), scale=jnp.asarray(src.get('.scale')))


serialize.register('test_scaled', Scaled, _encode, _decode)


def _normal(seed: int, shape, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _tree() -> dict:
  """Scaled over a dense, a quantized and a masked base; a Masked of a Scaled; shared Scaled storage."""
  scale = lambda seed: jnp.abs(_normal(seed, (1, OUT))) + 0.5
  params = {
      'a': {'kernel': Scaled(_normal(0, (IN, OUT)), scale(1))},
      'b': {'kernel': Scaled(core.quantize(_normal(2, (IN, OUT)), bits=3, group_size=8), scale(3))},
      'c': {'kernel': core.Masked(Scaled(_normal(4, (IN, OUT), jnp.bfloat16), scale(5).astype(jnp.bfloat16)),
                                  _normal(6, (IN, OUT)) > 0)},
      'd': {'kernel': _normal(7, (IN, OUT)), 'bias': _normal(8, (OUT,))},
      'e': {'kernel': _normal(9, (IN, OUT))},
  }
  keep = _normal(10, (IN, 1)) > 0  # a masked plain value is stored as its kept entries: zero the others
  params['d']['kernel'] = Scaled(core.Masked(jnp.where(keep, params['d']['kernel'], 0), keep), scale(11))
  return core.tie(params, ['d/kernel', 'e/kernel'], name='tied')


def test_round_trip_is_bit_exact_and_bytes_match_stats(tmp_path):
  params = _tree()
  assert 'test_scaled' in serialize.kinds() and serialize.kinds()['test_scaled'] is Scaled
  path = tmp_path / 'open.jc.safetensors'
  written = serialize.save(path, params)
  back = serialize.load(path)
  assert isinstance(back['a']['kernel'], Scaled) and isinstance(back['b']['kernel'].base, core.Quantized)
  assert isinstance(back['c']['kernel'].value, Scaled) and isinstance(back[core.SHARED]['tied'], Scaled)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  chex.assert_trees_all_equal(back, params)  # every stored array, bit for bit (the masked values are Scaled)
  chex.assert_trees_all_equal_dtypes(back, params)
  assert written == stats.totals(params).disk


def test_summary_counts_the_new_kind():
  params = _tree()
  counts = stats.leaf_counts(params)
  a = counts['a/kernel']
  assert (a.params, a.stored, a.flops) == (IN * OUT, IN * OUT + OUT, 2 * IN * OUT + OUT)
  assert a.nonzero == int(np.count_nonzero(np.asarray(params['a']['kernel'].materialize())))
  assert a.disk == IN * OUT * 4 + OUT * 4
  # The tied storage counts once; both places count their parameters.
  assert counts['_shared/tied'].stored == params[core.SHARED]['tied'].stored_params()
  assert counts['d/kernel'].params == counts['e/kernel'].params == IN * OUT
  table = str(stats.summary(params, by='weight'))
  assert 'a/kernel' in table and '_shared/tied' in table


def test_unregistered_kind_is_a_clear_error(tmp_path):

  @leaf_lib.leaf_type
  @dataclasses.dataclass(frozen=True)
  class Unregistered(Scaled):
    pass

  with pytest.raises(TypeError, match='serialize.register'):
    serialize.save(tmp_path / 'x.safetensors', {'w': Unregistered(_normal(0, (IN, OUT)), _normal(1, (1, OUT)))})
  with pytest.raises(ValueError, match='already registered'):
    serialize.register('masked', Scaled, _encode, _decode)


def _tiny_llama() -> tuple[models.Llama, dict]:
  model = models.Llama(models.LlamaConfig(vocab_size=50, hidden_size=IN, intermediate_size=OUT, num_layers=2,
                                          num_heads=2, num_kv_heads=2, max_position_embeddings=32))
  params = model.init(jax.random.key(0))
  up = 'layers/1/mlp/up_proj/kernel'
  params = core.paths.replace(params, {up: Scaled(core.paths.get(params, up), jnp.abs(_normal(1, (1, OUT))) + 0.5)})
  return model, params


def test_model_runs_and_exports_with_the_new_kind(tmp_path):
  model, params = _tiny_llama()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(2, 7)), jnp.int32)
  logits = model.apply(params, tokens)
  dense = core.materialize_tree(params)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model.apply(dense, tokens)), rtol=1e-5, atol=1e-5)
  models.save_pretrained(tmp_path, model, params)  # export materializes any leaf kind
  _, loaded = models.from_pretrained(tmp_path)
  np.testing.assert_allclose(np.asarray(model.apply(loaded, tokens)), np.asarray(logits), rtol=1e-5, atol=1e-5)


def sharded_main() -> None:
  """Run in a process with 8 virtual devices: the new kind is placed by path rules and runs under jit."""
  from jaxcompress.train import sharding
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(2, 2, 2)
  model, params = _tiny_llama()
  specs = sharding.param_specs(params, mesh, model.sharding_rules())
  up = 'layers/1/mlp/up_proj/kernel'
  assert specs[f'{up}/base'] == jax.sharding.PartitionSpec('fsdp', 'tensor'), specs[f'{up}/base']
  assert specs[f'{up}/scale'] == jax.sharding.PartitionSpec(None, 'tensor'), specs[f'{up}/scale']
  shardings = sharding.tree_shardings(params, specs, mesh)
  placed = jax.device_put(params, shardings)
  leaf = core.paths.get(placed, up)
  assert leaf.base.addressable_shards[0].data.shape == (IN // 2, OUT // 2)  # split 2 (fsdp) x 2 (tensor)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, size=(4, 7)), jnp.int32)
  tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  sharded = jax.jit(model.apply)(placed, tokens)
  single = model.apply(jax.device_put(params, jax.devices()[0]), jax.device_put(tokens, jax.devices()[0]))
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: model.apply(p, tokens).sum()))(placed)
  assert isinstance(core.paths.get(grads, up), Scaled)
  print('sharded ok')


def run_on_8_devices(module: str, function: str) -> str:
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(XLA_FLAGS=xla_settings.xla_flags(8), JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             JAX_DEFAULT_MATMUL_PRECISION='highest')
  proc = subprocess.run([sys.executable, '-c', f'import {module} as m; m.{function}()'], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, f'{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
  return proc.stdout


@pytest.mark.slow
@pytest.mark.subprocess
def test_sharded_jit_on_8_devices():
  assert 'sharded ok' in run_on_8_devices('tests.core.test_open_leaf', 'sharded_main')
