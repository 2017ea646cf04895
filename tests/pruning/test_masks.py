"""Scores, patterns and distributions against NumPy float64 references; bad input is refused."""

import jax
import numpy as np
import pytest

from jaxcompress import core
from jaxcompress import pruning
from jaxcompress.pruning._src import masks
from tests.pruning import reference as ref


def _params(seed=0):
  rs = np.random.RandomState(seed)
  return {'layers': [{'a': {'kernel': rs.randn(16, 8).astype(np.float32)},
                      'b': {'kernel': rs.randn(8, 24).astype(np.float32)}}],
          'lm_head': {'kernel': rs.randn(24, 5).astype(np.float32)}}


def test_magnitude_patterns_equal_numpy():
  w = np.random.RandomState(1).randn(16, 6)
  s = np.abs(w)
  per_layer = np.asarray(pruning.mask_from_scores(s, 0.25, 'per_layer'))
  keep = np.ones(w.size, bool)
  keep[np.argsort(s.reshape(-1), kind='stable')[:24]] = False
  np.testing.assert_array_equal(per_layer, keep.reshape(w.shape))
  # per output: each column (the inputs of one output) compared alone; the reference is in [out, in]
  np.testing.assert_array_equal(np.asarray(pruning.mask_from_scores(s, 0.75, 'per_output')),
                                ref.prune_smallest_rows(s.T, 12).T)
  for n, m in ((2, 4), (4, 8), (1, 4)):
    nm = np.asarray(pruning.mask_from_scores(s, 0.0, f'{n}:{m}'))
    expect = np.concatenate([ref.prune_smallest_rows(s.T[:, g:g + m], m - n) for g in range(0, 16, m)], 1).T
    np.testing.assert_array_equal(nm, expect)
    assert (nm.reshape(16 // m, m, 6).sum(1) == n).all()


def test_prune_uniform_global_erk_and_overrides():
  params = _params()
  out = pruning.prune(params, sparsity=0.5)
  flat = core.flatten(out)
  assert isinstance(flat['layers/0/a/kernel'], core.Masked)
  assert not isinstance(flat['lm_head/kernel'], core.Masked)  # heads are not selected by default
  assert flat['layers/0/a/kernel'].sparsity() == 0.5 and flat['layers/0/b/kernel'].sparsity() == 0.5
  # global: one threshold over both kernels
  out = pruning.prune(params, sparsity=0.5, distribution='global')
  allw = np.concatenate([np.abs(params['layers'][0][k]['kernel']).reshape(-1) for k in 'ab'])
  thresh = np.sort(allw)[allw.size // 2]
  for k in 'ab':
    np.testing.assert_array_equal(np.asarray(core.flatten(out)[f'layers/0/{k}/kernel'].mask),
                                  np.abs(params['layers'][0][k]['kernel']) >= thresh)
  # ERK: density ∝ (in + out) / (in·out), total sparsity kept
  shapes = {'a': (16, 8), 'b': (8, 24), 'c': (64, 64)}
  sp = pruning.erk_sparsities(shapes, 0.8)
  dens = {p: 1 - s for p, s in sp.items()}
  ratio = {p: dens[p] * np.prod(s) / np.sum(s) for p, s in shapes.items() if dens[p] < 1}
  assert np.ptp(list(ratio.values())) < 1e-9
  kept = sum(dens[p] * np.prod(s) for p, s in shapes.items())
  assert abs(kept - 0.2 * sum(np.prod(s) for s in shapes.values())) < 1e-6
  # a small layer would need density > 1: kept dense, the others rescaled
  sp = pruning.erk_sparsities({'tiny': (2, 2), 'big': (256, 256)}, 0.5)
  assert sp['tiny'] == 0.0 and 0.5 < sp['big'] < 0.501
  out = pruning.prune(params, sparsity=0.5, overrides={'/b/': 0.75})
  assert core.flatten(out)['layers/0/b/kernel'].sparsity() == 0.75
  assert core.flatten(out)['layers/0/a/kernel'].sparsity() == 0.5


@pytest.mark.parametrize('sparsity', [-0.1, 1.0, 1.5, float('nan')])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
  with pytest.raises(ValueError, match='sparsity'):
    pruning.prune(_params(), sparsity=sparsity)
  w = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match='sparsity'):
    pruning.wanda_layer(w, np.ones((3, 8), np.float32), sparsity=sparsity)
  with pytest.raises(ValueError, match='sparsity'):
    pruning.sparsegpt_layer(w, np.ones((3, 8), np.float32), sparsity=sparsity)


@pytest.mark.parametrize('pattern,match', [('4:4', 'N < M'), ('5:4', 'N < M'), ('0:4', 'N < M'),
                                           ('3:5', 'divisible'), ('two:four', 'not one of')])
def test_bad_nm_patterns_are_refused(pattern, match):
  with pytest.raises(ValueError, match=match):
    pruning.prune(_params(), sparsity=0.5, pattern=pattern)
  w = np.ones((16, 4), np.float32)
  for fn in (pruning.wanda_layer, pruning.sparsegpt_layer):
    with pytest.raises(ValueError, match=match):
      fn(w, np.ones((3, 16), np.float32), pattern=pattern)


def test_selection_matching_nothing_is_refused():
  with pytest.raises(ValueError, match='matches no weight'):
    pruning.prune(_params(), sparsity=0.5, selection=core.Rules(include='nothing_here'))


def test_prune_is_jax_friendly_and_keeps_values():
  params = jax.tree.map(lambda x: x, _params())
  out = pruning.prune(params, sparsity=0.5, pattern='2:4')
  m = core.flatten(out)['layers/0/a/kernel']
  np.testing.assert_array_equal(np.asarray(m.value), params['layers'][0]['a']['kernel'])
  assert pruning.sparsity_of(out) == 0.5


def test_ties_and_negative_scores_are_pruned_as_a_stable_sort_would():
  rs = np.random.RandomState(0)
  for trial in range(6):
    x = rs.randn(12, 5).astype(np.float32)
    if trial % 2:
      x = np.round(x)  # many ties, -0.0 among them
    for k in (0, 1, 6, 11):
      got = np.asarray(masks._prune_smallest(x, k, 0))
      np.testing.assert_array_equal(got, np.argsort(np.argsort(x, 0, kind='stable'), 0, kind='stable') >= k)
      got = np.asarray(masks._prune_smallest(x, 3 * k, None))
      ranks = np.argsort(np.argsort(x.reshape(-1), kind='stable'), kind='stable')
      np.testing.assert_array_equal(got, (ranks >= 3 * k).reshape(x.shape))
