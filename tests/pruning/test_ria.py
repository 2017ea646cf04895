"""RIA (Zhang et al., ICLR 2024) against a float64 NumPy reference written from the paper's equations, against
what it must beat (magnitude pruning at 50%, on one layer and on the trained fixture), and as a recipe stage."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import core, pruning, recipes, registry
from tests.pruning import reference as ref
from tests.pruning.test_layer_solvers import f32, layer


@pytest.mark.parametrize('pattern, nm, a', [(None, None, 0.5), (None, None, 1.0), ('2:4', (2, 4), 0.5)])
def test_ria_mask_equals_the_float64_reference(pattern, nm, a):
  w, x = layer(0)
  for sparsity in ((0.5, 0.7) if nm is None else (0.5,)):
    got = pruning.ria_layer(f32(w), f32(x), sparsity=sparsity, pattern=pattern, activation_power=a)
    want = ref.ria(w.T, x, sparsity, nm, a).T
    # float32 scores against float64 ones: a tie broken the other way at most
    assert np.mean(np.asarray(got.mask) != want) < 2e-3, (sparsity, a)
    if nm is None:  # exactly round(sparsity · in) inputs of every output pruned
      assert np.sum(~np.asarray(got.mask), axis=0).tolist() == [round(sparsity * w.shape[0])] * w.shape[1]


def test_ria_differs_from_wanda_where_a_channel_is_small_everywhere():
  """An output column with small weights everywhere: Wanda prunes its inputs like any other column's, RIA scores
  them relative to the column's own sum, so the two masks differ."""
  w, x = layer(1)
  w[:, 3] *= 1e-3
  r = pruning.ria_layer(f32(w), f32(x), activation_power=1.0)
  wd = pruning.wanda_layer(f32(w), f32(x))
  assert np.any(np.asarray(r.mask) != np.asarray(wd.mask))


def test_ria_beats_magnitude_on_output_error():
  w, x = layer(3, n_in=64, n_out=32, tokens=256)
  dense = x @ w

  def err(masked):
    return np.linalg.norm(dense - x @ np.asarray(masked.materialize(), np.float64))

  for pattern in (None, '2:4'):
    mag = pruning.prune({'k': {'kernel': f32(w)}}, sparsity=0.5, pattern=pattern,
                        selection=core.Rules(include='kernel'))['k']['kernel']
    assert err(pruning.ria_layer(f32(w), f32(x), pattern=pattern)) < 0.8 * err(mag), pattern


def test_bad_input_is_refused():
  w, x = layer(4, n_in=16)
  with pytest.raises(ValueError, match='ria: col_sq_norms has shape'):
    pruning.ria_from_norms(f32(w), jnp.ones(3))
  with pytest.raises(ValueError, match='NaN or inf'):
    pruning.ria_from_norms(f32(w), jnp.full(16, jnp.nan))
  with pytest.raises(ValueError, match=r'ria: activation_power=-1 is outside \[0.0, inf\)'):
    recipes.parse('ria(activation_power=-1)')


@pytest.mark.slow
def test_ria_beats_magnitude_at_50_percent_on_the_fixture():
  """The trained causal-LM fixture at 50% unstructured: RIA's held-out perplexity is below magnitude's."""
  from jaxcompress.eval import lm
  from jaxcompress.recipes import fixture
  model, params = fixture.load('fixture')
  _, train, valid = fixture.data(fixture.FIXTURE_DIR)
  rows = train.sequences[np.random.RandomState(0).permutation(train.num_sequences)[:32], :64].astype(np.int32)
  data = [rows[i:i + 16] for i in range(0, 32, 16)]
  ppl = {}
  for name in ('magnitude', 'ria'):
    m = registry.get(name)
    _, out = m.apply(model, params, data, registry.make_config(m, {'sparsity': 0.5}))
    assert abs(pruning.sparsity_of(out) - 0.5) < 0.01
    ppl[name] = lm.rows_perplexity(model, out, valid[:128].astype(np.int32), batch_size=16).perplexity
  assert ppl['ria'] < ppl['magnitude'], ppl
