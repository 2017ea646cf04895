"""The committed causal-LM fixture: its weights, its rebuilt held-out rows and its recorded perplexity agree."""

import jax
import numpy as np

from experiments import fixture
from jaxcompress.eval import lm


def test_fixture_scores_its_recorded_held_out_perplexity():
  model, params = fixture.load('fixture')
  _, train, valid = fixture.data()
  record = fixture.training_record()
  assert train.sequences.shape[1] == valid.shape[1] == record['flags']['seq_len'] + 1
  score = jax.jit(lm.sequence_nll, static_argnums=0)
  nll, count = 0.0, 0
  for lo in range(0, len(valid), 64):
    rows = valid[lo:lo + 64]
    n, c = score(model, params, rows[:, :-1], rows[:, 1:], np.ones(rows[:, 1:].shape, bool))
    nll, count = nll + float(np.sum(n, dtype=np.float64)), count + int(np.sum(c))
  results = record['results']
  assert count == results['valid_tokens']
  np.testing.assert_allclose(np.exp(nll / count), results['valid_perplexity'], rtol=1e-4)
  assert results['valid_perplexity'] < results['unigram_perplexity'] / 5  # it learned the language
