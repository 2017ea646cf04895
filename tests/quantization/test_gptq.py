"""GPTQ: codes equal to a NumPy float64 implementation of the paper's Algorithm 1; beats round-to-nearest."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, quantization
from jaxcompress.quantization._src import gptq as gptq_src
from tests.quantization import reference as ref


def _layer(seed, n=64, out=24, tokens=200):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((tokens, n)) * rng.uniform(0.2, 3.0, n)  # uneven input scales, as in LLMs
  return rng.standard_normal((n, out)), x


@pytest.mark.parametrize('bits,group_size,act_order,symmetric,block_size', [
    (4, None, False, False, 16),   # per-channel, several blocks
    (3, 16, False, False, 32),     # groups smaller than blocks: group grids from the block-start weights
    (4, 16, True, False, 16),      # act-order with static groups
    (2, None, True, True, 32),     # symmetric, act-order
    (8, 32, False, False, 16),     # groups spanning blocks
])
def test_gptq_matches_float64_reference(bits, group_size, act_order, symmetric, block_size):
  w, x = _layer(bits)
  h = x.T @ x
  with jax.enable_x64(True):
    leaf = quantization.gptq_from_hessian(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=group_size,
                                          act_order=act_order, symmetric=symmetric, block_size=block_size)
    codes, deq = np.asarray(leaf.codes_unpacked()), np.asarray(leaf.materialize())
  want_codes, want, _, _ = ref.gptq(w.T, h, bits=bits, groupsize=group_size, act_order=act_order,
                                    symmetric=symmetric, blocksize=block_size)
  np.testing.assert_array_equal(codes, want_codes.T)
  np.testing.assert_allclose(deq, want.T, rtol=1e-6, atol=1e-6)  # materialize runs in float32


@pytest.mark.parametrize('bits,group_size,symmetric,block_size', [
    (3, 16, False, 16),   # the outside check's setting: W3, groups, act-order
    (4, 16, False, 32),   # groups smaller than blocks
    (4, 32, True, 16),    # groups spanning blocks, symmetric
])
def test_gptq_act_order_dynamic_groups_match_float64_reference(bits, group_size, symmetric, block_size):
  """static_groups=False, the authors' default under act-order: group g is the next group_size rows of the
  permuted order, its grid formed from the weights as updated when the solver reaches it; the leaf keeps each
  input's group as g_idx."""
  w, x = _layer(bits)
  h = x.T @ x
  with jax.enable_x64(True):
    leaf = quantization.gptq_from_hessian(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=group_size,
                                          act_order=True, symmetric=symmetric, block_size=block_size,
                                          static_groups=False)
    codes, deq = np.asarray(leaf.codes_unpacked()), np.asarray(leaf.materialize())
  want_codes, want, scale, _, g_idx = ref.gptq(w.T, h, bits=bits, groupsize=group_size, act_order=True,
                                               symmetric=symmetric, blocksize=block_size, static_groups=False,
                                               return_g_idx=True)
  np.testing.assert_array_equal(np.asarray(leaf.g_idx), g_idx)
  assert not np.array_equal(g_idx, np.arange(len(g_idx)) // group_size)  # the groups really are permuted
  np.testing.assert_array_equal(codes, want_codes.T)
  np.testing.assert_allclose(np.asarray(leaf.scale), scale.T, rtol=1e-6)
  np.testing.assert_allclose(deq, want.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('bits,group_size,act_order,static_groups,symmetric', [
    (3, 16, False, True, False),   # groups found as the solver reaches them
    (2, None, False, True, True),  # per channel, symmetric
    (3, 16, True, False, False),   # act-order, the authors' dynamic groups
    (4, 16, True, True, False),    # act-order, static groups
])
def test_mse_grid_search_matches_float64_reference(bits, group_size, act_order, static_groups, symmetric):
  """mse=True: every group's range from the authors' clipping search, as the NumPy float64 reference of it."""
  w, x = _layer(20 + bits)
  w = w * np.random.default_rng(bits).standard_t(3, w.shape)  # heavy tails: shrinking the range pays
  h = x.T @ x
  with jax.enable_x64(True):
    leaf = quantization.gptq_from_hessian(jnp.asarray(w), jnp.asarray(h), bits=bits, group_size=group_size,
                                          act_order=act_order, symmetric=symmetric, block_size=16,
                                          static_groups=static_groups, mse=True)
    codes, scale = np.asarray(leaf.codes_unpacked()), np.asarray(leaf.scale)
  want_codes, _, want_scale, _ = ref.gptq(w.T, h, bits=bits, groupsize=group_size, act_order=act_order,
                                          symmetric=symmetric, blocksize=16, static_groups=static_groups, mse=True)
  np.testing.assert_allclose(scale, want_scale.T, rtol=1e-12)
  np.testing.assert_array_equal(codes, want_codes.T)
  _, _, minmax_scale, _ = ref.gptq(w.T, h, bits=bits, groupsize=group_size, act_order=act_order,
                                   symmetric=symmetric, blocksize=16, static_groups=static_groups)
  assert np.mean(want_scale < minmax_scale * (1 - 1e-9)) > 0.5  # most ranges were shrunk


def test_mse_grid_lowers_each_columns_rounding_error():
  """The search keeps p = 1 when nothing shorter is better, so each column's Σ|Q(w) - w|^2.4 is at most
  min-max's; on heavy-tailed weights it is well below it (in total 0.81x at 3 bits, 0.85x at 4 symmetric, 0.66x at
  2 here)."""
  w = np.random.default_rng(0).standard_t(3, (128, 32)).astype(np.float32)
  for bits, symmetric in ((3, False), (4, True), (2, False)):
    err = {}
    for mse in (False, True):
      s, z = gptq_src.grid_params(jnp.asarray(w), bits, symmetric, mse)
      q = np.clip(np.round(w / np.asarray(s)) + np.asarray(z), 1 if symmetric else 0, 2 ** bits - 1)
      err[mse] = (np.abs((q - np.asarray(z)) * np.asarray(s) - w) ** 2.4).sum(axis=0)
    assert np.all(err[True] <= err[False] * (1 + 1e-6)) and err[True].sum() < 0.9 * err[False].sum(), err


def test_static_and_dynamic_act_order_groups_both_beat_round_to_nearest_and_differ():
  w, x = _layer(3)
  h = x.T @ x
  errs = {}
  for static in (True, False):
    leaf = quantization.gptq_from_hessian(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), bits=3,
                                          group_size=16, act_order=True, static_groups=static)
    assert (leaf.g_idx is None) == static
    errs[static] = quantization.layer_error(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), leaf)
  rtn = core.quantize(jnp.asarray(w, jnp.float32), bits=3, group_size=16, symmetric=False)
  e_rtn = quantization.layer_error(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), rtn)
  assert errs[True] < e_rtn and errs[False] < e_rtn and errs[True] != errs[False], (errs, e_rtn)


def test_gptq_float32_agrees_with_reference():
  w, x = _layer(7, n=48, out=16)
  leaf = quantization.gptq_layer(w.astype(np.float32), x.astype(np.float32), bits=4, group_size=16)
  _, want, _, _ = ref.gptq(w.T, x.T @ x, bits=4, groupsize=16)
  close = np.isclose(np.asarray(leaf.materialize()), want.T, rtol=1e-4, atol=1e-4)
  assert close.mean() > 0.99  # float32 rounding may flip a code at a tie, rarely


@pytest.mark.parametrize('bits', [3, 4])
def test_gptq_beats_round_to_nearest_on_layer_output(bits):
  rng = np.random.default_rng(10 + bits)
  # correlated inputs (a low-rank signal plus noise), as a transformer's hidden states are
  x = (rng.standard_normal((512, 16)) @ rng.standard_normal((16, 128)) + 0.3 * rng.standard_normal((512, 128)))
  w, x = rng.standard_normal((128, 64)).astype(np.float32), x.astype(np.float32)
  g = quantization.gptq_layer(w, x, bits=bits, group_size=32)
  r = quantization.quantize_weight(w, bits=bits, group_size=32)
  e_g, e_r = quantization.layer_error(x, w, g), quantization.layer_error(x, w, r)
  assert e_g < 0.9 * e_r, (e_g, e_r)


def test_dead_inputs_and_zero_columns_stay_finite():
  w, x = _layer(3)
  x[:, 5] = 0.0  # an input that never fires: H_55 = 0
  w[:, 2] = 0.0  # an all-zero output column
  w[:, 3] = 0.5  # a constant one
  leaf = quantization.gptq_layer(w.astype(np.float32), x.astype(np.float32), bits=4, group_size=16)
  deq = np.asarray(leaf.materialize())
  assert np.isfinite(deq).all()
  np.testing.assert_array_equal(deq[:, 2], 0.0)
  assert deq[5].tolist() == [0.0] * w.shape[1] or np.isfinite(deq[5]).all()


def test_not_positive_definite_hessian_raises_damping_with_a_warning():
  w, _ = _layer(4, n=32, out=8)
  h = -np.eye(32)  # negative mean diagonal: no relative damping can fix it, so it fails clearly
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    with pytest.raises(ValueError, match='not positive definite even with damp'):
      quantization.gptq_from_hessian(w.astype(np.float32), h.astype(np.float32), max_damp_tries=2)
  assert sum('raising damp' in str(c.message) for c in caught) == 2
  h = np.eye(32)
  h[0, 1] = h[1, 0] = 1.2  # eigenvalue -0.2: indefinite until damp reaches 1
  with pytest.warns(RuntimeWarning, match='raising damp to 1'):
    leaf = quantization.gptq_from_hessian(w.astype(np.float32), h.astype(np.float32), damp=0.01)
  assert np.isfinite(np.asarray(leaf.materialize())).all()


@pytest.mark.parametrize('kwargs,match', [
    (dict(bits=1), 'bits=1 is not supported'),
    (dict(bits=16), 'bits=16 is not supported'),
    (dict(group_size=24), 'group_size=24 does not divide the input dimension 64'),
    (dict(damp=0.0), 'damp=0.0 must be > 0'),
])
def test_gptq_rejects_bad_arguments(kwargs, match):
  w, x = _layer(0)
  with pytest.raises(ValueError, match=match):
    quantization.gptq_layer(w, x, **kwargs)


def test_gptq_rejects_nan_in_weights_or_calibration_data():
  w, x = _layer(0)
  x[3, 4] = np.inf
  with pytest.raises(ValueError, match='x has 1 NaN/inf'):
    quantization.gptq_layer(w, x)
  w[0, 0] = np.nan
  with pytest.raises(ValueError, match='w has 1 NaN/inf'):
    quantization.gptq_from_hessian(w, np.eye(64))


@pytest.mark.parametrize('group_size,act_order', [(16, False), (None, True)])
def test_gptq_under_a_pruning_mask_matches_float64_reference(group_size, act_order):
  w, x = _layer(11)
  h = x.T @ x
  mask = np.random.default_rng(3).random(w.shape) > 0.5
  w = w * mask  # a pruned kernel's values
  with jax.enable_x64(True):
    leaf = quantization.gptq_from_hessian(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=group_size,
                                          act_order=act_order, block_size=16, mask=jnp.asarray(mask))
    codes, deq = np.asarray(leaf.codes_unpacked()), np.asarray(leaf.materialize())
  want_codes, want, _, _ = ref.gptq(w.T, h, bits=4, groupsize=group_size, act_order=act_order, blocksize=16,
                                    mask=mask.T)
  np.testing.assert_array_equal(codes, want_codes.T)
  np.testing.assert_allclose(deq * mask, want.T, rtol=1e-6, atol=1e-6)


def test_gptq_under_a_mask_beats_quantizing_then_masking():
  # quantizing the pruned kernel as if dense, then masking, loses what the pruned weights' updates compensated
  w, x = _layer(12, n=64, out=32, tokens=400)
  mask = np.random.default_rng(4).random(w.shape) > 0.5
  w = (w * mask).astype(np.float32)
  h = jnp.asarray((x.T @ x).astype(np.float32))
  joint = np.asarray(quantization.gptq_from_hessian(jnp.asarray(w), h, bits=3, group_size=16,
                                                    mask=jnp.asarray(mask)).materialize()) * mask
  after = np.asarray(quantization.gptq_from_hessian(jnp.asarray(w), h, bits=3, group_size=16).materialize()) * mask
  err = lambda q: np.linalg.norm(x @ (w - q)) / np.linalg.norm(x @ w)
  assert err(joint) < err(after)
  with pytest.raises(ValueError, match='mask has shape'):
    quantization.gptq_from_hessian(jnp.asarray(w), h, bits=3, mask=jnp.ones((3, 3), bool))
