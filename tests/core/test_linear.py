"""`linear` dispatch, embedding helpers, and typed leaves as ordinary pytrees (jit, tree ops, device_put)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core

IN, OUT, RANK, VOCAB = 64, 8, 3, 11


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _weights() -> dict:
  """One [IN, OUT] weight of each kind, with a float64 NumPy copy of the dense array it stands for."""
  w = _normal(0, (IN, OUT))
  mask = np.random.default_rng(1).uniform(size=(IN, OUT)) < 0.5
  qw = core.quantize(jnp.asarray(w), bits=4, group_size=16)
  a, b = _normal(2, (IN, RANK)), _normal(3, (RANK, OUT))
  qa = core.quantize(jnp.asarray(a), bits=8, group_size=None)
  return {
      'dense': (jnp.asarray(w), w.astype(np.float64)),
      'masked': (core.Masked(jnp.asarray(w), jnp.asarray(mask)), np.where(mask, w, 0).astype(np.float64)),
      'quantized': (qw, np.asarray(qw.materialize(), np.float64)),
      'lowrank': (core.LowRank(jnp.asarray(a), jnp.asarray(b)), a.astype(np.float64) @ b),
      'lowrank_quantized': (core.LowRank(qa, jnp.asarray(b)), np.asarray(qa.materialize(), np.float64) @ b),
      'masked_quantized': (core.Masked(qw, jnp.asarray(mask)),
                           np.where(mask, np.asarray(qw.materialize(), np.float64), 0)),
  }


KINDS = ('dense', 'masked', 'quantized', 'lowrank', 'lowrank_quantized', 'masked_quantized')


@pytest.fixture(scope='module')
def weights() -> dict:
  out = _weights()
  assert tuple(out) == KINDS
  return out


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('with_bias', [False, True])
def test_linear_matches_dense_reference(weights, kind, with_bias):
  w, ref = weights[kind]
  x = _normal(4, (2, 3, IN))
  bias = _normal(5, (OUT,))
  y = core.linear(jnp.asarray(x), w, jnp.asarray(bias) if with_bias else None)
  assert y.shape == (2, 3, OUT) and y.dtype == jnp.float32
  expected = x.astype(np.float64) @ ref + (bias if with_bias else 0)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-4)


def test_linear_computes_in_input_dtype_and_accepts_compressed_bias(weights):
  w, ref = weights['quantized']
  x = _normal(6, (4, IN))
  y = core.linear(jnp.asarray(x, jnp.bfloat16), w)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), x @ ref, rtol=0.05, atol=0.1)
  bias = np.arange(OUT, dtype=np.float32)
  masked_bias = core.Masked(jnp.asarray(bias), jnp.asarray(bias % 2 == 0))
  y = core.linear(jnp.asarray(x), weights['dense'][0], masked_bias)
  np.testing.assert_allclose(np.asarray(y), x @ weights['dense'][1] + np.where(bias % 2 == 0, bias, 0),
                             rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('kind', KINDS)
def test_linear_rejects_mismatched_input(weights, kind):
  with pytest.raises(ValueError, match=rf'\[\.\.\., {IN - 1}\]'):
    core.linear(jnp.ones((2, IN - 1)), weights[kind][0])


def test_linear_rejects_non_2d_weight():
  with pytest.raises(ValueError, match='linear'):
    core.linear(jnp.ones((2, IN)), jnp.ones((IN, OUT, 2)))


@pytest.mark.parametrize('quantized', [False, True])
def test_embedding_lookup_and_tied_head(quantized):
  table = _normal(7, (VOCAB, IN))
  leaf = core.quantize(jnp.asarray(table), bits=8, group_size=None) if quantized else jnp.asarray(table)
  dense = np.asarray(core.materialize(leaf), np.float64)
  ids = np.array([[0, 3, 10], [5, 5, 1]])
  out = core.embedding_lookup(leaf, jnp.asarray(ids))
  assert out.shape == (2, 3, IN)
  np.testing.assert_array_equal(np.asarray(out), dense[ids].astype(np.float32))
  assert core.embedding_lookup(leaf, jnp.asarray(ids), dtype=jnp.bfloat16).dtype == jnp.bfloat16
  x = _normal(8, (2, IN))
  logits = core.linear_transposed(jnp.asarray(x), leaf)
  assert logits.shape == (2, VOCAB)
  np.testing.assert_allclose(np.asarray(logits), x @ dense.T, rtol=1e-5, atol=1e-4)


def _every_kind(weights: dict) -> dict:
  params = {'layers': {i: {k: {'kernel': weights[k][0]} for k in KINDS} for i in (0, 1)},
            'embed': {'embedding': jnp.asarray(_normal(9, (VOCAB, IN)))}}
  return core.tie(params, ['layers/0/dense/kernel', 'layers/1/dense/kernel'], name='dense')


def test_jit_over_every_leaf_kind(weights):
  params = _every_kind(weights)
  x = jnp.asarray(_normal(10, (3, IN)))

  def forward(p, x):
    p = core.resolve(p)
    return {i: {k: core.linear(x, p['layers'][i][k]['kernel']) for k in KINDS} for i in (0, 1)}

  eager = forward(params, x)
  jitted = jax.jit(forward)(params, x)
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)
  for k, (_, ref) in weights.items():
    np.testing.assert_allclose(np.asarray(jitted[1][k]), np.asarray(x, np.float64) @ ref, rtol=1e-5, atol=1e-4)
  # Compressed leaves can also be jit outputs.
  out = jax.jit(lambda p: p)(params)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  chex.assert_trees_all_equal(core.materialize_tree(core.resolve(out)),
                              core.materialize_tree(core.resolve(params)))


def test_leaves_survive_tree_map_flatten_unflatten_and_device_put(weights):
  params = _every_kind(weights)
  dense = core.materialize_tree(core.resolve(params))
  leaves, treedef = jax.tree.flatten(params)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  mapped = jax.tree.map(lambda x: x, params)
  moved = jax.device_put(params, jax.devices('cpu')[0])
  for tree in (rebuilt, mapped, moved):
    assert jax.tree.structure(tree) == treedef
    for i in (0, 1):
      for k in KINDS:
        assert type(tree['layers'][i][k]['kernel']) is type(params['layers'][i][k]['kernel'])
    chex.assert_trees_all_equal(core.materialize_tree(core.resolve(tree)), dense)
  # Static metadata (bits, group size, packing, shared name) is part of the structure, not a leaf.
  qw = params['layers'][0]['quantized']['kernel']
  assert len(jax.tree.leaves(qw)) == 3  # codes, scale, zero
  assert jax.tree.structure(qw) != jax.tree.structure(core.quantize(weights['dense'][0], bits=3, group_size=16))
  # Compressed weights stay whole under the weight-leaf predicate.
  flat = core.flatten(params)
  assert isinstance(flat['layers/0/masked_quantized/kernel'], core.Masked)
  assert isinstance(flat['layers/1/dense/kernel'], core.Shared)


def test_eval_shape_keeps_leaf_kinds(weights):
  params = _every_kind(weights)
  shapes = jax.eval_shape(lambda p: p, params)
  lr = shapes['layers'][0]['lowrank']['kernel']
  assert isinstance(lr, core.LowRank) and lr.shape == (IN, OUT)
  assert isinstance(shapes['layers'][0]['masked']['kernel'], core.Masked)


@pytest.mark.parametrize('kind', ['masked', 'lowrank', 'masked_quantized', 'lowrank_quantized'])
def test_tree_map_to_non_array_leaves(weights, kind):
  w = weights[kind][0]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  shardings = jax.tree.map(lambda _: sharding, w)  # as for jit in_shardings or a sharded device_put
  assert type(shardings) is type(w)
  moved = jax.device_put(w, shardings)
  chex.assert_trees_all_equal(core.materialize(moved), core.materialize(w))
  assert type(jax.tree.map(lambda _: None, w)) is type(w)
  assert type(jax.tree.map(lambda x: x.shape, w)) is type(w)
