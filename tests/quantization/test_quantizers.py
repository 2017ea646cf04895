"""Quantizers: NumPy float64 references, error bounds, MSE clipping, serialize and orbax round trips."""

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxcompress import core, quantization
from tests.quantization import reference as ref

IN, OUT = 64, 24


def _w(seed=0, shape=(IN, OUT)):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize('bits,group_size,symmetric', [(2, 16, False), (3, None, False), (4, 16, True),
                                                       (5, None, True), (8, 16, False)])
def test_int_matches_reference_and_error_is_at_most_half_a_step(bits, group_size, symmetric):
  w = _w(bits)
  leaf = quantization.quantize_weight(w, bits=bits, group_size=group_size, symmetric=symmetric)
  want = ref.rtn(w.T.astype(np.float64), bits=bits, groupsize=group_size, symmetric=symmetric).T
  np.testing.assert_allclose(leaf.materialize(), want, rtol=1e-6, atol=1e-6)
  err = np.abs(np.asarray(leaf.materialize()) - w)
  assert (err <= np.asarray(quantization.max_error(leaf)) * (1 + 1e-5)).all()


def test_per_tensor_uses_one_scale_and_zero():
  w = _w(1)
  leaf = quantization.quantize_weight(w, bits=4, group_size=None, per_tensor=True)
  assert np.unique(np.asarray(leaf.scale)).size == 1 and np.unique(np.asarray(leaf.zero)).size == 1
  lo, hi = min(w.min(), 0), max(w.max(), 0)
  scale = (hi - lo) / 15
  want = scale * (np.clip(np.round(w / scale) + np.round(-lo / scale), 0, 15) - np.round(-lo / scale))
  np.testing.assert_allclose(leaf.materialize(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('fmt', ['int', 'nf4'])
def test_mse_clip_search_matches_reference_and_never_loses_to_min_max(fmt):
  w = _w(2)
  w[3, :] *= 8  # outliers make clipping worth it
  grid = quantization.quantizers.DEFAULT_CLIP_GRID
  leaf = quantization.quantize_weight(w, bits=3, fmt=fmt, group_size=16, clip='mse')
  plain = quantization.quantize_weight(w, bits=3, fmt=fmt, group_size=16)
  # reference: per (group, column), the shrink factor with the smallest squared error
  g = w.astype(np.float64).reshape(4, 16, OUT)
  best = np.full((4, OUT), np.inf)
  out = np.zeros_like(g)
  for p in grid:
    if fmt == 'int':
      lo, hi = np.minimum(g.min(1), 0) * p, np.maximum(g.max(1), 0) * p
      s = (hi - lo) / 7
      z = np.round(-lo / s)
      deq = (np.clip(np.round(g / s[:, None]) + z[:, None], 0, 7) - z[:, None]) * s[:, None]
    else:
      s = np.abs(g).max(1) * p
      lv = core.quantized.NF4_LEVELS.astype(np.float64)
      deq = lv[np.abs(g[..., None] / s[:, None, :, None] - lv).argmin(-1)] * s[:, None]
    e = ((deq - g) ** 2).sum(1)
    better = e < best
    best = np.where(better, e, best)
    out = np.where(better[:, None], deq, out)
  np.testing.assert_allclose(leaf.materialize(), out.reshape(IN, OUT), rtol=1e-5, atol=1e-5)
  assert np.sum((np.asarray(leaf.materialize()) - w) ** 2) < np.sum((np.asarray(plain.materialize()) - w) ** 2)


@pytest.mark.parametrize('fmt,dtype,mx', [('fp8', ml_dtypes.float8_e4m3fn, 448.0),
                                          ('fp8_e5m2', ml_dtypes.float8_e5m2, 57344.0)])
def test_fp8_matches_reference(fmt, dtype, mx):
  w = _w(3)
  leaf = quantization.quantize_weight(w, fmt=fmt, group_size=16)
  s = np.abs(w.reshape(4, 16, OUT)).max(1) / mx
  want = ((w.reshape(4, 16, OUT) / s[:, None]).astype(dtype).astype(np.float32) * s[:, None]).reshape(IN, OUT)
  np.testing.assert_allclose(leaf.materialize(), want, rtol=1e-6)
  assert leaf.codes.dtype == dtype


def _leaves():
  w = _w(4)
  return {
      'int3': quantization.quantize_weight(w, bits=3, group_size=16, clip='mse'),
      'int4_sym': quantization.quantize_weight(w, bits=4, group_size=None, symmetric=True),
      'int8_tensor': quantization.quantize_weight(w, bits=8, group_size=None, per_tensor=True),
      'nf4': quantization.quantize_weight(w, fmt='nf4', group_size=32),
      'e4m3': quantization.quantize_weight(w, fmt='fp8', group_size=None),
      'e5m2': quantization.quantize_weight(w, fmt='fp8_e5m2', group_size=16),
      'gptq': quantization.gptq_layer(w, _w(5, (100, IN)), bits=4, group_size=16),
  }


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
  assert jax.tree.structure(a) == jax.tree.structure(b)


def test_leaves_round_trip_through_serialize_bit_exactly(tmp_path):
  leaves = _leaves()
  core.serialize.save(tmp_path / 'q.safetensors', leaves)
  back = core.serialize.load(tmp_path / 'q.safetensors')
  _same(leaves, back)
  for k in leaves:
    np.testing.assert_array_equal(leaves[k].materialize(), back[k].materialize())


def test_leaves_round_trip_through_orbax_bit_exactly(tmp_path):
  leaves = _leaves()
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', leaves)
  with ocp.StandardCheckpointer() as ckpt:
    back = ckpt.restore(tmp_path / 'ckpt', leaves)
  _same(leaves, back)


@pytest.mark.parametrize('bits', [1, 9, 3.5])
def test_rejects_unsupported_bits(bits):
  with pytest.raises(ValueError, match='bits='):
    quantization.quantize_weight(_w(), bits=bits)


def test_rejects_group_size_that_does_not_divide_in():
  with pytest.raises(ValueError, match='group_size=24 does not divide the input dimension 64'):
    quantization.quantize_weight(_w(), group_size=24)


def test_rejects_nan_weights():
  w = _w()
  w[1, 2] = np.nan
  with pytest.raises(ValueError, match='w has 1 NaN/inf'):
    quantization.quantize_weight(w, group_size=16)


@pytest.mark.parametrize('fmt', ['int', 'nf4', 'fp8', 'fp8_e5m2'])
def test_zero_and_constant_groups_are_exact_and_finite(fmt):
  w = _w()
  w[:, 0] = 0.0
  w[:, 1] = 0.25
  leaf = quantization.quantize_weight(w, fmt=fmt, bits=4, group_size=16, clip='none')
  deq = np.asarray(leaf.materialize())
  assert np.isfinite(deq).all()
  np.testing.assert_array_equal(deq[:, 0], 0.0)
  np.testing.assert_allclose(deq[:, 1], 0.25, rtol=1e-2)
