"""`Quantized`, `quantize` and the code packers against a NumPy float64 reference of the module's equations."""

from __future__ import annotations

import math
import statistics

import chex
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress.core import quantized as q_lib

IN, OUT = 64, 8
# Rounding ties may fall either way between float32 and float64 arithmetic.
TIE_TOL = 1e-3


def _weight(seed: int = 0, shape: tuple[int, int] = (IN, OUT)) -> np.ndarray:
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  w[:, 0] = np.abs(w[:, 0])  # an all-positive column: its zero point sits at code 0
  w[:, 1] = -np.abs(w[:, 1])  # an all-negative column: its zero point sits at the top code
  return w


# --- NumPy float64 reference, written from the equations in the `quantized` module docstring. ---


def ref_groups(w: np.ndarray, group_size: int | None) -> np.ndarray:
  """[in, out] -> [groups, group_size, out] float64."""
  gs = w.shape[0] if group_size is None else group_size
  return np.asarray(w, np.float64).reshape(w.shape[0] // gs, gs, w.shape[1])


def ref_expand(per_group: np.ndarray, rows: int) -> np.ndarray:
  """[groups, out] -> [rows, out]."""
  return np.repeat(np.asarray(per_group, np.float64), rows // per_group.shape[0], axis=0)


def ref_affine(w: np.ndarray, bits: int, group_size: int | None, symmetric: bool):
  """Min-max scale per group; returns (scale, zero before rounding or None)."""
  g = ref_groups(w, group_size)
  if symmetric:
    scale = np.abs(g).max(axis=1) / (2 ** (bits - 1) - 1)
    return np.where(scale == 0, 1.0, scale), None
  lo, hi = np.minimum(g.min(axis=1), 0.0), np.maximum(g.max(axis=1), 0.0)
  scale = (hi - lo) / (2 ** bits - 1)
  scale = np.where(scale == 0, 1.0, scale)
  return scale, -lo / scale


def ref_int_targets(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
  """w / scale + zero, clipped to the code range: the real number each code rounds."""
  z = 2 ** (bits - 1) if zero is None else ref_expand(zero, w.shape[0])
  return np.clip(np.asarray(w, np.float64) / ref_expand(scale, w.shape[0]) + z, 0, 2 ** bits - 1)


def ref_pack(q: np.ndarray, bits: int) -> np.ndarray:
  """Byte i of a column holds codes i*per ... i*per+per-1, the first in the lowest bits."""
  per = 8 // bits
  out = np.zeros((q.shape[0] // per, q.shape[1]), np.int64)
  for j in range(per):
    out |= q[j::per].astype(np.int64) << (j * bits)
  return out.astype(np.uint8)


def assert_nearest_int(codes, targets: np.ndarray):
  """Each code is a nearest integer to its real target (ties either way)."""
  codes = np.asarray(codes, np.float64)
  np.testing.assert_array_less(np.abs(codes - targets), 0.5 + TIE_TOL)
  assert np.mean(codes == np.round(targets)) > 0.98


# --- pack_codes / unpack_codes ---


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
  rng = np.random.default_rng(bits)
  q = rng.integers(0, 2 ** bits, size=(16, 5), dtype=np.uint8)
  packed = q_lib.pack_codes(jnp.asarray(q), bits)
  assert packed.dtype == jnp.uint8
  assert packed.shape == (16 * bits // 8, 5)
  np.testing.assert_array_equal(np.asarray(packed), ref_pack(q, bits))
  np.testing.assert_array_equal(np.asarray(q_lib.unpack_codes(packed, bits)), q)


def test_pack_codes_rejects_ragged_input():
  with pytest.raises(ValueError, match='in=5'):
    q_lib.pack_codes(jnp.zeros((5, 3), jnp.uint8), 4)


# --- affine_params / encode_int ---


@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('group_size', [None, 16, 32])
@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_affine_params_and_encode_int_match_reference(bits, group_size, symmetric):
  w = _weight(bits)
  scale, zero = q_lib.affine_params(jnp.asarray(w), bits, group_size, symmetric)
  ref_scale, ref_zero = ref_affine(w, bits, group_size, symmetric)
  groups = 1 if group_size is None else IN // group_size
  chex.assert_shape(scale, (groups, OUT))
  np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
  if symmetric:
    assert zero is None
  else:
    chex.assert_shape(zero, (groups, OUT))
    assert_nearest_int(zero, ref_zero)
  codes = q_lib.encode_int(jnp.asarray(w), scale, zero, bits)
  assert codes.dtype == jnp.uint8 and codes.shape == (IN, OUT)
  targets = ref_int_targets(w, np.asarray(scale, np.float64),
                            None if zero is None else np.asarray(zero, np.float64), bits)
  assert_nearest_int(codes, targets)


def test_affine_params_all_zero_group_gets_unit_scale():
  w = np.zeros((8, 2), np.float32)
  for symmetric in (False, True):
    scale, _ = q_lib.affine_params(jnp.asarray(w), 4, None, symmetric)
    np.testing.assert_array_equal(np.asarray(scale), np.ones((1, 2)))


# --- quantize(fmt='int') ---


@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('group_size', [None, 16, 32])
@pytest.mark.parametrize('bits, pack', [(2, True), (2, False), (3, True), (4, True), (4, False), (8, True)])
def test_quantize_int_matches_reference(bits, pack, group_size, symmetric):
  w = _weight(10 + bits)
  qw = core.quantize(jnp.asarray(w), bits=bits, group_size=group_size, symmetric=symmetric, pack=pack)
  assert isinstance(qw, core.Quantized)
  assert (qw.bits, qw.group_size, qw.fmt, qw.shape) == (bits, group_size, 'int', (IN, OUT))
  assert qw.packed == (pack and bits in (2, 4))  # 8 % bits == 0 and more than one code per byte
  rows = IN * bits // 8 if qw.packed else IN
  chex.assert_shape(qw.codes, (rows, OUT))
  codes = np.asarray(qw.codes_unpacked())
  assert codes.dtype == np.uint8 and codes.shape == (IN, OUT)
  assert codes.max() < 2 ** bits
  if qw.packed:
    np.testing.assert_array_equal(np.asarray(qw.codes), ref_pack(codes, bits))

  ref_scale, ref_zero = ref_affine(w, bits, group_size, symmetric)
  np.testing.assert_allclose(np.asarray(qw.scale), ref_scale, rtol=1e-6)
  scale = np.asarray(qw.scale, np.float64)
  if symmetric:
    assert qw.zero is None
    zero = np.full_like(scale, 2 ** (bits - 1))
  else:
    assert_nearest_int(qw.zero, ref_zero)
    zero = np.asarray(qw.zero, np.float64)
  assert_nearest_int(codes, ref_int_targets(w, scale, None if symmetric else zero, bits))

  # w' = (q - zero) * scale from the leaf's own codes, and min-max keeps every error within half a step.
  dense = np.asarray(qw.materialize())
  assert dense.dtype == np.float32
  expected = (codes - ref_expand(zero, IN)) * ref_expand(scale, IN)
  np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_less(np.abs(dense - w), 0.5 * ref_expand(scale, IN) * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize('group_size', [None, 16])
@pytest.mark.parametrize('symmetric', [False, True])
def test_quantize_error_shrinks_as_bits_grow(group_size, symmetric):
  w = jnp.asarray(_weight(3))
  errors = [float(jnp.mean((core.quantize(w, bits=b, group_size=group_size, symmetric=symmetric)
                            .materialize() - w) ** 2)) for b in (2, 3, 4, 8)]
  assert all(a > b for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-4


def test_packed_and_unpacked_materialize_identically():
  w = jnp.asarray(_weight(4))
  for bits in (2, 4):
    a = core.quantize(w, bits=bits, group_size=16, pack=True)
    b = core.quantize(w, bits=bits, group_size=16, pack=False)
    assert a.packed and not b.packed
    chex.assert_trees_all_equal(a.materialize(), b.materialize())


def test_quantize_keeps_weight_dtype_and_honours_scale_dtype():
  w = jnp.asarray(_weight(5), jnp.bfloat16)
  qw = core.quantize(w, bits=4, group_size=16)
  assert qw.scale.dtype == jnp.bfloat16 and qw.dtype == jnp.bfloat16
  assert qw.materialize().dtype == jnp.bfloat16
  q16 = core.quantize(w, bits=4, group_size=16, scale_dtype=jnp.float16)
  assert q16.materialize().dtype == jnp.float16
  np.testing.assert_allclose(np.asarray(qw.materialize(), np.float32), np.asarray(w, np.float32),
                             atol=0.6 * float(jnp.max(qw.scale.astype(jnp.float32))))


def test_fake_quantize_is_quantize_then_materialize():
  w = jnp.asarray(_weight(6))
  chex.assert_trees_all_equal(core.fake_quantize(w, bits=3, group_size=16),
                              core.quantize(w, bits=3, group_size=16).materialize())


# --- quantize(fmt='nf4') and fmt='fp8' ---


@pytest.mark.parametrize('pack', [True, False])
@pytest.mark.parametrize('group_size', [None, 16, 32])
def test_quantize_nf4_matches_reference(group_size, pack):
  w = _weight(20)
  qw = core.quantize(jnp.asarray(w), fmt='nf4', group_size=group_size, pack=pack)
  assert (qw.fmt, qw.bits, qw.packed) == ('nf4', 4, pack)
  codes = np.asarray(qw.codes_unpacked())
  assert codes.max() < 16
  absmax = np.abs(ref_groups(w, group_size)).max(axis=1)
  np.testing.assert_allclose(np.asarray(qw.scale), absmax, rtol=1e-6)
  levels = q_lib.NF4_LEVELS.astype(np.float64)
  x = w / ref_expand(absmax, IN)
  dist = np.abs(x[..., None] - levels)  # [in, out, 16]
  # The code is a nearest level (equal to the reference argmin except on ties).
  np.testing.assert_array_less(np.abs(x - levels[codes]), dist.min(-1) + 1e-6)
  assert np.mean(codes == dist.argmin(-1)) > 0.98
  np.testing.assert_allclose(np.asarray(qw.materialize()), levels[codes] * ref_expand(absmax, IN),
                             rtol=1e-6, atol=1e-7)


def test_nf4_levels_are_normal_quantiles():
  # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1) plus an exact zero, scaled to [-1, 1].
  ppf = statistics.NormalDist().inv_cdf
  offset = 0.9677083
  pos = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  ref = np.sort(np.array(pos + [0.0] + neg))
  ref /= np.abs(ref).max()
  levels = q_lib.NF4_LEVELS
  np.testing.assert_allclose(levels, ref, atol=1e-6)
  assert levels[0] == -1.0 and levels[-1] == 1.0 and 0.0 in levels


@pytest.mark.parametrize('group_size', [None, 16, 32])
def test_quantize_fp8_matches_reference(group_size):
  w = _weight(30)
  qw = core.quantize(jnp.asarray(w), fmt='fp8', group_size=group_size)
  assert (qw.fmt, qw.bits, qw.packed) == ('fp8', 8, False)
  assert qw.codes.dtype == jnp.float8_e4m3fn
  scale = np.abs(ref_groups(w, group_size)).max(axis=1) / 448.0
  np.testing.assert_allclose(np.asarray(qw.scale), scale, rtol=1e-6)
  x = w / ref_expand(scale, IN)
  got = np.asarray(qw.codes).astype(np.float64)
  ref = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  # The code is the nearest e4m3 value (equal to the reference except on rounding ties).
  np.testing.assert_array_less(np.abs(got - x), np.abs(ref - x) + 1e-5 * (1 + np.abs(x)))
  assert np.mean(got == ref) > 0.98
  np.testing.assert_allclose(np.asarray(qw.materialize()), got * ref_expand(scale, IN), rtol=1e-6, atol=1e-7)


# --- codebook ---


def test_codebook_materializes_shared_and_per_column_levels():
  rng = np.random.default_rng(7)
  codes = rng.integers(0, 8, size=(8, 3), dtype=np.uint8)
  book = rng.normal(size=8).astype(np.float32)
  qw = core.Quantized(codes=jnp.asarray(codes), scale=None, codebook=jnp.asarray(book), bits=3,
                      fmt='codebook', logical_shape=(8, 3))
  assert qw.dtype == np.float32
  np.testing.assert_allclose(np.asarray(qw.materialize()), book[codes], rtol=1e-7)
  per_col = rng.normal(size=(3, 8)).astype(np.float32)
  scale = rng.uniform(0.5, 2, size=(2, 3)).astype(np.float32)
  qc = core.Quantized(codes=jnp.asarray(codes), scale=jnp.asarray(scale), codebook=jnp.asarray(per_col), bits=3,
                      group_size=4, fmt='codebook', logical_shape=(8, 3))
  expected = per_col[np.arange(3)[None, :], codes] * np.repeat(scale, 4, axis=0)
  np.testing.assert_allclose(np.asarray(qc.materialize()), expected, rtol=1e-6)


# --- sizes ---


def test_quantized_sizes():
  w = jnp.asarray(_weight(8, shape=(6, 5)))
  qw = core.quantize(w, bits=3, group_size=None)  # 30 codes of 3 bits: 90 bits on disk
  side = 2 * 5 * 4  # float32 scale and zero, one group per column
  assert qw.stored_params() == 30
  assert qw.memory_bytes() == 30 + side
  assert qw.disk_bytes() == math.ceil(90 / 8) + side
  assert qw.matmul_flops() == 2 * 30
  assert core.memory_bytes(qw) == qw.memory_bytes() and core.disk_bytes(qw) == qw.disk_bytes()
  q4 = core.quantize(jnp.asarray(_weight(9)), bits=4, group_size=16, symmetric=True)
  assert q4.memory_bytes() == IN * OUT // 2 + (IN // 16) * OUT * 4  # two codes a byte in memory too
  assert q4.disk_bytes() == IN * OUT // 2 + (IN // 16) * OUT * 4


# --- errors ---


def test_quantize_rejects_group_size_that_does_not_divide_in():
  w = jnp.asarray(_weight(0))
  for group_size in (5, 128):
    with pytest.raises(ValueError, match='group_size'):
      core.quantize(w, bits=4, group_size=group_size)


@pytest.mark.parametrize('bits', [9, 16])
def test_quantize_rejects_bits_out_of_range(bits):
  with pytest.raises(ValueError, match='bits'):
    core.quantize(jnp.asarray(_weight(0)), bits=bits, group_size=None)


def test_quantize_rejects_zero_bits():
  with pytest.raises(ValueError, match='bits'):
    core.quantize(jnp.asarray(_weight(0)), bits=0, group_size=None)


def test_quantize_rejects_zero_group_size():
  with pytest.raises(ValueError, match='group_size'):
    core.quantize(jnp.asarray(_weight(0)), bits=4, group_size=0)


def test_quantize_rejects_non_2d_weight():
  for shape in ((8,), (2, 8, 4)):
    with pytest.raises(ValueError, match='2-D'):
      core.quantize(jnp.ones(shape), bits=4, group_size=None)


def test_quantize_rejects_unknown_fmt():
  for fmt in ('int5', 'codebook'):
    with pytest.raises(ValueError, match='fmt'):
      core.quantize(jnp.asarray(_weight(0)), fmt=fmt, group_size=None)


@pytest.mark.parametrize('kwargs, name', [
    (dict(fmt='float'), 'fmt'),
    (dict(bits=0), 'bits'),
    (dict(bits=9), 'bits'),
    (dict(fmt='nf4', bits=3), 'bits'),
    (dict(logical_shape=(4, 2, 2, 1)), 'logical_shape'),  # [in, out] or [experts, in, out] only
])
def test_quantized_constructor_validates(kwargs, name):
  fields = dict(codes=jnp.zeros((4, 4), jnp.uint8), scale=jnp.ones((1, 4)), bits=4, logical_shape=(4, 4))
  with pytest.raises(ValueError, match=name):
    core.Quantized(**{**fields, **kwargs})
