"""The committed causal-LM fixture: its weights, its rebuilt held-out rows and its recorded perplexity agree."""

import numpy as np
import pytest

from jaxcompress.recipes import fixture
from jaxcompress.eval import lm


@pytest.mark.slow
def test_fixture_scores_its_recorded_held_out_perplexity():
  model, params = fixture.load('fixture')
  _, train, valid = fixture.data()
  record = fixture.training_record()
  assert train.sequences.shape[1] == valid.shape[1] == record['flags']['seq_len'] + 1
  result = lm.rows_perplexity(model, params, valid, batch_size=64)
  results = record['results']
  assert result.count == results['valid_tokens']
  np.testing.assert_allclose(result.perplexity, results['valid_perplexity'], rtol=1e-4)
  assert results['valid_perplexity'] < results['unigram_perplexity'] / 5  # it learned the language
