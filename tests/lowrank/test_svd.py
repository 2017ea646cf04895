"""Truncated, Fisher-weighted, activation-aware and whitened SVD against NumPy float64 references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import calibration as cal
from jaxcompress import core, lowrank, models

RS = np.random.RandomState(0)
W = RS.randn(16, 12).astype(np.float32)
# Anisotropic, correlated inputs (a few loud channels), as in real activations.
X = (RS.randn(300, 16) @ (RS.randn(16, 16) * np.linspace(0.2, 3, 16)[:, None])).astype(np.float32)


def np_weighted_best(w, s, r):
  """float64 Eckart–Young on S·W: the best rank-r Ŵ for ‖S (W − Ŵ)‖_F, and the discarded singular values."""
  w, s = np.asarray(w, np.float64), np.asarray(s, np.float64)
  u, sig, vt = np.linalg.svd(s @ w, full_matrices=False)
  return np.linalg.solve(s, (u[:, :r] * sig[:r]) @ vt[:r]), sig[r:]


def test_plain_svd_matches_numpy_and_error_is_discarded_values():
  lr = lowrank.factorize(W, 5)
  assert isinstance(lr, core.LowRank) and lr.rank == 5 and lr.shape == (16, 12)
  ref, tail = np_weighted_best(W, np.eye(16), 5)
  np.testing.assert_allclose(core.materialize(lr), ref, atol=2e-5)
  err = np.linalg.norm(np.asarray(W, np.float64) - np.asarray(core.materialize(lr), np.float64))
  np.testing.assert_allclose(err, np.sqrt(np.sum(tail ** 2)), rtol=1e-5)
  np.testing.assert_allclose(lowrank.truncation_loss(W, 5), np.sqrt(np.sum(tail ** 2)), rtol=1e-5)


def test_svd_llm_truncation_loss_is_discarded_singular_values_of_whitened_matrix():
  xtx = np.asarray(X, np.float64).T @ np.asarray(X, np.float64)
  s = lowrank.whitening({'xtx': jnp.asarray(xtx, jnp.float32), 'count': 300}, damp=0.0)
  lr = lowrank.factorize(W, 4, s)
  loss = np.linalg.norm(np.asarray(X, np.float64) @ (np.asarray(W, np.float64)
                                                     - np.asarray(core.materialize(lr), np.float64)))
  chol = np.linalg.cholesky(xtx)  # float64 reference whitening
  tail = np.linalg.svd(chol.T @ np.asarray(W, np.float64), compute_uv=False)[4:]
  np.testing.assert_allclose(loss, np.sqrt(np.sum(tail ** 2)), rtol=1e-4)
  np.testing.assert_allclose(lowrank.truncation_loss(W, 4, s), np.sqrt(np.sum(tail ** 2)), rtol=1e-4)


def test_svd_llm_damps_a_singular_gram_matrix():
  x = X[:5]  # 5 tokens, 16 inputs: XᵀX has rank 5
  stats = {'xtx': jnp.asarray(x.T @ x), 'count': 5}
  lr = lowrank.factorize(W, 4, lowrank.whitening(stats, damp=1e-3))
  assert np.all(np.isfinite(core.materialize(lr)))
  # With 5 tokens a rank-5 map on their span is exact; rank 4 already beats plain SVD on those tokens.
  out_err = lambda w_hat: np.linalg.norm(x @ (W - np.asarray(core.materialize(w_hat))))
  assert out_err(lr) < out_err(lowrank.factorize(W, 4))


def test_fwsvd_weighted_error_is_minimal_among_rank_r_candidates():
  fisher = RS.gamma(0.5, size=16).astype(np.float32)  # skewed row importances
  s = lowrank.fisher_scale(fisher)
  r = 3
  werr = lambda w_hat: np.linalg.norm(np.sqrt(fisher.astype(np.float64))[:, None]
                                      * (W.astype(np.float64) - np.asarray(w_hat, np.float64)))
  got = werr(core.materialize(lowrank.factorize(W, r, s)))
  ref, tail = np_weighted_best(W, np.diag(np.sqrt(fisher)), r)
  np.testing.assert_allclose(got, np.sqrt(np.sum(tail ** 2)), rtol=1e-4)
  candidates = [core.materialize(lowrank.factorize(W, r))]  # plain SVD
  rs = np.random.RandomState(1)
  for _ in range(50):  # random and perturbed-optimum rank-r candidates
    candidates.append(rs.randn(16, r) @ rs.randn(r, 12))
    a, b = np.asarray(core.materialize(lowrank.factorize(W, r, s).a)), np.asarray(lowrank.factorize(W, r, s).b)
    candidates.append((a + 1e-2 * rs.randn(*a.shape)) @ b)
  assert all(got <= werr(c) * (1 + 1e-6) for c in candidates)
  assert got < werr(candidates[0]) * 0.99  # strictly better than ignoring the weights


def test_activation_aware_methods_beat_plain_svd_on_layer_output_error():
  m = {'abs_sum': jnp.sum(jnp.abs(X), 0), 'count': jnp.asarray(300)}
  h = {'xtx': jnp.asarray(X.T @ X), 'count': jnp.asarray(300)}
  out_err = lambda lr: np.linalg.norm(X.astype(np.float64) @ (W - np.asarray(core.materialize(lr), np.float64)))
  for r in (2, 4, 8):
    plain = out_err(lowrank.factorize(W, r))
    assert out_err(lowrank.factorize(W, r, lowrank.activation_scale(m, 0.5))) < plain
    assert out_err(lowrank.factorize(W, r, lowrank.whitening(h, 0.0))) < plain


def test_rank_rules_against_numpy():
  sig = np.array([4.0, 2.0, 1.0, 0.5, 0.1])
  e = np.cumsum(sig ** 2) / np.sum(sig ** 2)
  for energy in (0.1, 0.8, 0.95, 0.99, 1.0):
    assert lowrank.energy_rank(sig, energy) == int(np.argmax(e >= energy - 1e-12)) + 1
  assert lowrank.keep_rank((256, 1024), 0.5) == int(0.5 * 256 * 1024 / 1280)
  assert lowrank.keep_rank((4, 4), 0.01) == 1


def test_budget_allocation_is_optimal_for_equal_shapes():
  shapes = {'a': (6, 6), 'b': (6, 6), 'c': (6, 6)}
  rs = np.random.RandomState(2)
  spectra = {k: np.sort(rs.gamma(1.0, size=6))[::-1] for k in shapes}
  budget = 0.5  # 54 of 108 parameters: 4 ranks of 12 after the three rank-1 floors... total rank 4
  ranks = lowrank.budget_ranks(spectra, shapes, budget)
  total_rank = int(budget * 108) // 12
  assert sum(ranks.values()) == total_rank
  kept = lambda rk: sum(np.sum(spectra[k][:rk[k]] ** 2) for k in shapes)
  best = max(kept(dict(zip(shapes, c))) for c in itertools.product(range(1, 7), repeat=3) if sum(c) == total_rank)
  np.testing.assert_allclose(kept(ranks), best)


def test_bad_ranks_are_named():
  with pytest.raises(ValueError, match=r'rank=0 .* must be in \[1, 12\]'):
    lowrank.factorize(W, 0)
  with pytest.raises(ValueError, match=r'rank=13 .* must be in \[1, 12\]'):
    lowrank.factorize(W, 13)
  with pytest.raises(ValueError, match='rank=0 must be >= 1'):
    lowrank.RankRule(rank=0)
  with pytest.raises(ValueError, match='exactly one'):
    lowrank.RankRule(rank=2, energy=0.9)
  with pytest.raises(ValueError, match='budget=1.5'):
    lowrank.RankRule(budget=1.5)


MODEL = models.Llama(models.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2,
                                        num_heads=4, num_kv_heads=2, max_position_embeddings=32))
TOKENS = np.random.RandomState(0).randint(0, 48, (4, 13)).astype(np.int32)


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.key(0))


@pytest.fixture(scope='module')
def stats(params):
  """Whole-model statistics of MODEL on TOKENS, for ASVD (abs_mean) and SVD-LLM (hessian)."""
  return cal.calibrate(MODEL, params, [{'tokens': TOKENS[:, :-1]}], cal.combine(h=cal.hessian(), m=cal.abs_mean()))


@pytest.mark.slow
def test_compress_every_method_on_a_model(params, stats):
  fisher = lowrank.fisher_rows(MODEL, params, [{'inputs': TOKENS[:, :-1], 'targets': TOKENS[:, 1:]}])
  assert set(fisher) == set(MODEL.select(params).paths)
  apply = jax.jit(MODEL.apply)
  for method, st in (('svd', None), ('fwsvd', fisher), ('asvd', stats), ('svd_llm', stats)):
    out = lowrank.compress(params, config=lowrank.SVDConfig(method=method, ranks=lowrank.RankRule(keep=0.5)),
                           stats=st)
    assert len(lowrank.ranks_of(out)) == 14
    assert np.all(np.isfinite(apply(out, TOKENS[:, :-1])))
  sel = MODEL.select(params)
  dense = sum(np.prod(s) for s in sel.shapes)
  for rule in (lowrank.RankRule(rank=4), lowrank.RankRule(budget=0.5), lowrank.RankRule(energy=0.9)):
    ranks = lowrank.ranks_of(lowrank.compress(params, config=lowrank.SVDConfig(method='svd_llm', ranks=rule),
                                              stats=stats))
    kept = sum(ranks[p] * sum(s) if p in ranks else s[0] * s[1] for p, s in zip(sel.paths, sel.shapes))  # dense
    if rule.budget is not None:
      assert 0.45 * dense < kept <= 0.5 * dense
    if rule.rank is not None:
      assert set(ranks.values()) == {4}
  with pytest.raises(ValueError, match="method='asvd' needs calibration statistics"):
    lowrank.compress(params, config=lowrank.SVDConfig(method='asvd'))
  with pytest.raises(ValueError, match='rank=40 .* must be in'):
    lowrank.compress(params, config=lowrank.SVDConfig(ranks=lowrank.RankRule(rank=40)))


def test_weighted_factors_are_balanced():
  fisher = RS.gamma(0.2, size=16).astype(np.float32)
  lr = lowrank.factorize(W, 3, lowrank.fisher_scale(fisher))
  a, b = np.asarray(lr.a, np.float64), np.asarray(lr.b, np.float64)
  np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-4)
  np.testing.assert_allclose(a.T @ a, np.diag(np.diag(a.T @ a)), atol=1e-4 * np.abs(a.T @ a).max())


def test_svd_llm_squared_output_loss_is_sum_of_squared_discarded_values():
  # ‖(W − W')ᵀ Xᵀ‖² = Σ_{i>r} σ_i² of the whitened Lᵀ W, every rank, against float64 (no damping).
  xd, wd = np.asarray(X, np.float64), np.asarray(W, np.float64)
  sig = np.linalg.svd(np.linalg.cholesky(xd.T @ xd).T @ wd, compute_uv=False)
  s = lowrank.whitening({'xtx': jnp.asarray(xd.T @ xd, jnp.float32), 'count': 300}, damp=0.0)
  for r in (1, 3, 6, 11):
    delta = wd - np.asarray(core.materialize(lowrank.factorize(W, r, s)), np.float64)
    np.testing.assert_allclose(np.sum(np.square(delta.T @ xd.T)), np.sum(sig[r:] ** 2), rtol=2e-4)


def test_budget_never_stores_factors_larger_than_the_dense_kernel():
  assert lowrank.break_even_rank((256, 256)) == 127 and lowrank.break_even_rank((8, 8)) == 3
  assert lowrank.break_even_rank((256, 768)) == (256 * 768 - 1) // 1024
  shapes = {'flat': (8, 8), 'steep1': (8, 8), 'steep2': (8, 8)}
  spectra = {'flat': np.ones(8), 'steep1': 2.0 ** -np.arange(8.0), 'steep2': 3.0 ** -np.arange(8.0)}
  for budget in (0.3, 0.5, 0.8, 0.95):
    ranks = lowrank.budget_ranks(spectra, shapes, budget)
    cost = sum(64 if r is None else 16 * r for r in ranks.values())
    assert cost <= budget * 192
    assert all(r is None or 1 <= r <= 3 for r in ranks.values())
  # At 80% kept the flat spectrum (worst for a low-rank cut) stays dense; the steep ones are cut.
  ranks = lowrank.budget_ranks(spectra, shapes, 0.8)
  assert ranks['flat'] is None and ranks['steep1'] is not None and ranks['steep2'] is not None


def test_output_fisher_rows_of_a_linear_map_against_numpy():
  rs = np.random.RandomState(3)
  x, w = rs.randn(2, 5, 4).astype(np.float32), rs.randn(4, 3).astype(np.float32)
  noise = rs.randn(2, 5, 3).astype(np.float32)
  params = {'lin': {'kernel': jnp.asarray(w)}}
  loss = lowrank.output_fisher_loss(lambda p, b: b['x'] @ p['lin']['kernel'])
  got = lowrank.fisher_rows(None, params, [{'x': x[i], 'noise': noise[i]} for i in range(2)], loss=loss)
  ref = sum(np.sum(np.square(x[i].astype(np.float64).T @ noise[i].astype(np.float64)), axis=1) for i in range(2))
  np.testing.assert_allclose(got['lin/kernel'], ref, rtol=1e-5)


@pytest.mark.slow
def test_compress_model_block_by_block_equals_whole_model_calibration(params, stats):
  """Per-kernel rank rules run block by block on the statistics `calibrate` gives (so out of core too); a budget
  or a selection outside the blocks calibrates the whole model, which out of core refuses."""
  batches = [{'tokens': TOKENS[:, :-1]}]
  blocks, head = MODEL.selection_rules(), MODEL.selection_rules(head=True)
  # Each method block by block and on the whole model. The rules and methods are those of
  # test_compress_every_method_on_a_model, so their factorizations (eager, one compile per shape and rank) are
  # already compiled; the head adds lm_head's.
  cases = (('asvd', lowrank.RankRule(keep=0.5), blocks), ('svd_llm', lowrank.RankRule(energy=0.9), blocks),
           ('svd_llm', lowrank.RankRule(budget=0.5), blocks),
           ('asvd', lowrank.RankRule(keep=0.5), head))
  for method, rule, sel in cases:
    config = lowrank.SVDConfig(method=method, ranks=rule, rules=sel)
    got = core.flatten(lowrank.compress_model(MODEL, params, batches, config=config))
    want = core.flatten(lowrank.compress(params, config=config, stats=stats))
    assert list(got) == list(want) and lowrank.ranks_of(got) == lowrank.ranks_of(want), (method, rule)
    assert ('lm_head/kernel' in lowrank.ranks_of(got)) == sel.head
    for p in want:
      np.testing.assert_allclose(core.materialize(got[p]), core.materialize(want[p]), rtol=1e-5, atol=1e-6,
                                 err_msg=f'{method} {rule} {p}')
    with cal.record_sequential() as plans:
      try:
        lowrank.compress_model(MODEL, MODEL.abstract_params(), [], config=config)
      except cal.NotSequential:
        assert rule.budget is not None or sel.head, rule
      else:
        assert rule.budget is None and not sel.head, rule
        assert [(p.calibrate_on, p.per_group) for p in plans] == [('original', False)]
  with pytest.raises(ValueError, match=r"rank=40 for 'layers/0/attn/k_proj/kernel'"):  # before any calibration
    lowrank.compress_model(MODEL, params, [], config=lowrank.SVDConfig(method='svd_llm',
                                                                       ranks=lowrank.RankRule(rank=40)))
