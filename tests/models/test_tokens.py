"""Token ids and positions outside the model's tables: refused on the host, NaN (never another token) under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import models

VOCAB, POSITIONS = 64, 16
SPECS = {
    'llama': models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=1,
                                             num_heads=4, num_kv_heads=2, max_position_embeddings=POSITIONS)),
    'gpt2': models.GPT2(models.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, hidden_size=32, num_layers=1,
                                          num_heads=4)),
    'bert': models.Bert(models.BertConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=4,
                                          intermediate_size=48, max_position_embeddings=POSITIONS, mlm_head=True)),
}
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 8)), jnp.int32)


@pytest.fixture(scope='module', params=sorted(SPECS))
def spec_params(request):
  spec = SPECS[request.param]
  return spec, spec.init(jax.random.key(0))


ENTRY_POINTS = {
    'apply': lambda spec, params, tokens, **kw: spec.apply(params, tokens, **kw),
    'embed': lambda spec, params, tokens, **kw: spec.embed(params, tokens, **kw),
    'context': lambda spec, params, tokens, **kw: spec.context(tokens, **kw),
    'hidden_states': lambda spec, params, tokens, **kw: spec.hidden_states(params, tokens, **kw),
    'linear_inputs': lambda spec, params, tokens, **kw: spec.linear_inputs(params, tokens, **kw),
}


@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
@pytest.mark.parametrize('bad,message', [
    (-1, r'tokens: 1 id is outside \[0, 64\) \(vocab_size=64\), e\.g\. -1 at \[row, position\] \[1, 3\]; tokenize'),
    (VOCAB, r'tokens: 1 id is outside \[0, 64\) \(vocab_size=64\), e\.g\. 64 at \[row, position\] \[1, 3\]; tokenize'),
    (10 ** 6, r'outside \[0, 64\).*1000000'),
], ids=['negative', 'vocab_size', 'huge'])
def test_concrete_ids_outside_the_vocabulary_are_refused(spec_params, entry, bad, message):
  spec, params = spec_params
  with pytest.raises(ValueError, match=message):
    ENTRY_POINTS[entry](spec, params, TOKENS.at[1, 3].set(bad))


@pytest.mark.parametrize('entry', sorted(ENTRY_POINTS))
def test_sequences_longer_than_learned_positions_are_refused(spec_params, entry):
  spec, params = spec_params
  long = jnp.zeros((1, POSITIONS + 1), jnp.int32)
  if spec.max_positions() is None:  # rotary positions have no table
    assert ENTRY_POINTS[entry](spec, params, long) is not None
    return
  with pytest.raises(ValueError, match=r'17 tokens is longer than the 16 learned positions'):
    ENTRY_POINTS[entry](spec, params, long)
  with pytest.raises(ValueError, match=r'longer than the 16 learned positions'):  # a static shape: also in jit
    jax.jit(lambda p, t: spec.apply(p, t))(params, long)
  with pytest.raises(ValueError, match=r'positions: 1 id is outside \[0, 16\) \(max_positions=16\)'):
    ENTRY_POINTS[entry](spec, params, TOKENS, positions=jnp.arange(8)[None].repeat(2, 0).at[0, 7].set(16))


@pytest.mark.parametrize('bad', [-1, -VOCAB, VOCAB, VOCAB + 5])
def test_under_jit_invalid_ids_give_nan_not_another_token(spec_params, bad):
  """Traced ids cannot be checked: the embedding of an id outside [0, vocab) is NaN, and the NaN value row
  reaches every position of that sequence (masked attention weights are 0, and 0 * NaN is NaN). Other
  sequences of the batch are untouched."""
  spec, params = spec_params
  out = np.asarray(jax.jit(spec.apply)(params, TOKENS.at[0, 3].set(bad)))
  assert np.isnan(out[0]).all()
  np.testing.assert_array_equal(out[1], np.asarray(jax.jit(spec.apply)(params, TOKENS))[1])


def test_under_jit_positions_outside_the_table_give_nan():
  spec = SPECS['gpt2']
  params = spec.init(jax.random.key(0))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8)).at[0, 5].set(POSITIONS)
  out = np.asarray(jax.jit(lambda p, t, q: spec.apply(p, t, positions=q))(params, TOKENS, positions))
  assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
