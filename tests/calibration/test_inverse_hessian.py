"""The shared inverse-Hessian factor of the one-shot solvers against NumPy float64, its damping retries and bad
input, the windowed lazy update, and the bad-input behaviour of SparseGPT and GPTQ on top of it."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import pruning, quantization
from jaxcompress.calibration import inverse_hessian as ih


def hessian(seed=0, n=24, tokens=40, dead=()):
  rs = np.random.RandomState(seed)
  x = rs.randn(tokens, n) * rs.uniform(0.2, 3.0, n)
  x[:, list(dead)] = 0
  return x.T @ x


@pytest.mark.parametrize('act_order', [False, True])
def test_factor_is_upper_cholesky_of_damped_inverse(act_order):
  h = hessian(dead=(3, 7))
  f = ih.inverse_factor(jnp.asarray(h, jnp.float32), damp=0.05, act_order=act_order)
  # float64 reference, the papers' recipe: dead H_jj = 1, λ = damp · mean(diag H), U = chol((H + λI)⁻¹)ᵀ
  dead = np.diag(h) == 0
  want_h = h + np.diag(dead.astype(float))
  want_h = want_h + 0.05 * np.mean(np.diag(want_h)) * np.eye(24)
  perm = np.argsort(-np.diag(want_h), kind='stable') if act_order else np.arange(24)
  want_h = want_h[perm][:, perm]
  np.testing.assert_array_equal(np.asarray(f.dead), dead)
  np.testing.assert_array_equal(np.asarray(f.perm), perm)
  u = np.asarray(f.u, np.float64) / np.sqrt(np.mean(np.diag(h + np.diag(dead.astype(float)))))  # H was scaled
  want = np.linalg.cholesky(np.linalg.inv(want_h)).T
  assert np.allclose(np.tril(u, -1), 0)
  assert np.linalg.norm(u - want) / np.linalg.norm(want) < 1e-4
  assert f.damp == 0.05


def test_inverse_cholesky_by_halves_matches_numpy():
  h = hessian(1, n=40, tokens=80) + np.eye(40)
  u = np.asarray(ih.inverse_cholesky_lower(jnp.asarray(h, jnp.float32), leaf=8), np.float64)  # 3 levels
  want = np.linalg.inv(np.linalg.cholesky(h))
  assert np.linalg.norm(u - want) / np.linalg.norm(want) < 1e-4


def test_not_positive_definite_raises_damping_then_fails_clearly(caplog):
  h = np.eye(8)
  h[0, 1] = h[1, 0] = 1.2  # eigenvalue -0.2: fails until damp ≥ 0.2 (of mean diag 1)
  with pytest.warns(RuntimeWarning, match='raising damp to 1'):
    f = ih.inverse_factor(jnp.asarray(h, jnp.float32), damp=0.01, caller='test')
  assert f.damp == 1.0 and np.isfinite(np.asarray(f.u)).all()
  with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match='not positive definite even with damp=0.1'):
    ih.inverse_factor(jnp.asarray(h, jnp.float32), damp=0.01, max_tries=1)


@pytest.mark.parametrize('bad,match', [('nan', 'NaN/inf'), ('zero', 'the Hessian is zero'), ('shape', 'square'),
                                       ('damp', 'damp=0')])
def test_bad_hessians_are_refused(bad, match):
  h = hessian()
  h = {'nan': np.where(np.eye(24) > 0, np.nan, h), 'zero': 0 * h, 'shape': h[:, :5], 'damp': h}[bad]
  with pytest.raises(ValueError, match=match):
    ih.inverse_factor(jnp.asarray(h, jnp.float32), damp=0 if bad == 'damp' else 0.01)


@pytest.mark.parametrize('start', [0, 8, 16, 40])
def test_lazy_update_equals_the_full_update(start):
  rs = np.random.RandomState(start)
  w, e = rs.randn(48, 5), rs.randn(8, 5)
  u_rows = np.triu(rs.randn(8, 48), start)  # rows of an upper factor: zero left of the block
  got = ih.lazy_update(jnp.asarray(w), jnp.asarray(u_rows), jnp.asarray(e), jnp.int32(start))
  np.testing.assert_allclose(np.asarray(got), w - u_rows.T @ e, rtol=1e-5, atol=1e-5)


def _layer(n=32, out=8, tokens=64):
  rs = np.random.RandomState(0)
  return rs.randn(n, out).astype(np.float32), rs.randn(tokens, n).astype(np.float32)


@pytest.mark.parametrize('solver', ['sparsegpt', 'gptq'])
def test_nan_in_weights_or_inputs_is_refused_by_name(solver):
  w, x = _layer()
  fn = pruning.sparsegpt_layer if solver == 'sparsegpt' else quantization.gptq_layer
  bad_w, bad_x = w.copy(), x.copy()
  bad_w[4, 2], bad_x[7, 5] = np.nan, np.inf
  with pytest.raises(ValueError, match='w has 1 NaN/inf'):
    fn(bad_w, x)
  with pytest.raises(ValueError, match=r'x (has|hold).*\b1 NaN/inf'):
    fn(w, bad_x)
  with pytest.raises(ValueError, match='no calibration tokens'):
    fn(w, x[:0])
  with pytest.raises(ValueError, match='the Hessian is zero'):
    fn(w, 0 * x)


@pytest.mark.parametrize('solver', ['sparsegpt', 'gptq'])
def test_indefinite_hessian_gets_more_damping_and_a_finite_result(solver):
  w, _ = _layer()
  h = np.eye(32, dtype=np.float32)
  h[0, 1] = h[1, 0] = 1.2
  with pytest.warns(RuntimeWarning, match='raising damp'):
    if solver == 'sparsegpt':
      out = pruning.sparsegpt_from_hessian(w, h, block_size=16).materialize()
    else:
      out = quantization.gptq_from_hessian(w, h, block_size=16).materialize()
  assert np.isfinite(np.asarray(out)).all()


def test_too_few_tokens_still_give_a_finite_solution():
  w, x = _layer()
  # 3 tokens for 32 inputs: XᵀX has rank 3, damping makes it positive definite
  for out in (pruning.sparsegpt_layer(w, x[:3], block_size=16).value,
              quantization.gptq_layer(w, x[:3], block_size=16).materialize()):
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize('n', [24, 25])
def test_inplace_factor_matches_float64_and_overwrites_its_input(n):
  h = hessian(n=n, dead=(3, 7))
  buf = np.array(h, np.float32)
  f = ih.inverse_factor_inplace(buf, damp=0.05)
  assert f.u is buf  # the factor is the input's memory
  dead = np.diag(h) == 0
  want_h = h + np.diag(dead.astype(float))
  scale = np.mean(np.diag(want_h))
  want = np.linalg.cholesky(np.linalg.inv(want_h / scale + 0.05 * np.eye(n))).T
  np.testing.assert_array_equal(f.dead, dead)
  assert np.all(np.tril(f.u, -1) == 0)
  assert np.linalg.norm(f.u - want) / np.linalg.norm(want) < 1e-5
  # and the jitted factor of the same matrix, to float32 rounding
  ref = np.asarray(ih.inverse_factor(jnp.asarray(h, jnp.float32), damp=0.05).u)
  assert np.linalg.norm(f.u - ref) / np.linalg.norm(ref) < 1e-5


def test_inplace_factor_raises_damp_until_positive_definite_and_rejects_bad_input():
  h = hessian(n=16)
  w, v = np.linalg.eigh(h)
  w[:3] = -0.02 * w.mean()  # indefinite: damp 0.01 fails, 0.1 works
  bad = np.array((v * w) @ v.T, np.float32)
  with pytest.warns(RuntimeWarning, match='raising damp'):
    f = ih.inverse_factor_inplace(bad, damp=0.01)
  assert f.damp == pytest.approx(0.1) and np.isfinite(f.u).all()
  with pytest.raises(ValueError, match='writable C-contiguous float32'):
    ih.inverse_factor_inplace(h, damp=0.01)  # float64
  nan = np.array(h, np.float32)
  nan[2, 5] = np.nan
  with pytest.raises(ValueError, match='NaN/inf'):
    ih.inverse_factor_inplace(nan)
  with pytest.raises(ValueError, match='zero'):
    ih.inverse_factor_inplace(np.zeros((4, 4), np.float32))


def test_solvers_from_a_shared_factor_equal_the_solvers_from_the_hessian():
  h = jnp.asarray(hessian(n=32, tokens=60, dead=(5,)), jnp.float32)
  w = jnp.asarray(np.random.RandomState(1).randn(32, 12), jnp.float32)
  f = ih.inverse_factor(h, damp=0.01)
  a, b = pruning.sparsegpt_from_factor(w, f, sparsity=0.5, block_size=16), pruning.sparsegpt_from_hessian(
      w, h, sparsity=0.5, block_size=16)
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
  qa = quantization.gptq_from_factor(a.value, f, bits=4, group_size=16, block_size=16)
  qb = quantization.gptq_from_hessian(b.value, h, bits=4, group_size=16, block_size=16)
  for name in ('codes', 'scale', 'zero'):
    np.testing.assert_array_equal(np.asarray(getattr(qa, name)), np.asarray(getattr(qb, name)))
  with pytest.raises(ValueError, match='act-order'):
    quantization.gptq_from_factor(w, ih.inverse_factor(h, act_order=True), bits=4)


def test_wide_hessian_accumulates_in_row_blocks_like_one_product(monkeypatch):
  from jaxcompress.calibration import observers
  monkeypatch.setattr(observers, 'WIDE', 8)  # 16-wide inputs take the in-place row-block path
  monkeypatch.setattr(observers, 'ROWS', 4)
  rs = np.random.RandomState(0)
  obs = observers.hessian()
  stats = obs.init('w', 16)
  xs = [rs.randn(10, 16).astype(np.float32) for _ in range(2)]
  masks = [np.ones(10, np.float32), (np.arange(10) < 7).astype(np.float32)]
  for x, m in zip(xs, masks):
    stats = jax.jit(obs.update)(stats, jnp.asarray(x), jnp.asarray(m))
  want = sum((x * m[:, None]).astype(np.float64).T @ (x * m[:, None]) for x, m in zip(xs, masks))
  np.testing.assert_allclose(np.asarray(stats['xtx']), want, rtol=1e-5, atol=1e-4)
  assert int(stats['count']) == 17
