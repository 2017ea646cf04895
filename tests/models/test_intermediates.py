"""`apply(..., intermediates=...)`: hidden states after every block and attention probabilities, checked
against transformers' output_hidden_states / output_attentions, and unchanged under remat and scan."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import models
from tests import reference_models as parity

BOTH = ('hidden_states', 'attention')


def _tokens(batch: int = 2, seq: int = 9, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, parity.VOCAB, size=(batch, seq)).astype(np.int32)


def _torch_intermediates(ref, tokens, attention_mask):
  import torch
  ref.set_attn_implementation('eager')  # sdpa returns no attention probabilities
  with torch.no_grad():
    out = ref(torch.tensor(tokens), attention_mask=torch.tensor(attention_mask), output_hidden_states=True,
              output_attentions=True)
  return [h.float().numpy() for h in out.hidden_states], [a.float().numpy() for a in out.attentions]


@pytest.mark.parametrize('kind', ['llama', 'gpt2', 'bert'])
def test_match_transformers(kind, hf_checkpoint):
  path, ref = hf_checkpoint(kind)
  model, params = models.from_pretrained(path)
  tokens = _tokens()
  mask = np.ones_like(tokens)
  mask[1, -3:] = 0  # padding: masked keys get zero probability
  out, found = model.apply(params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask), intermediates=BOTH)
  ref_h, ref_a = _torch_intermediates(ref, tokens, mask)
  hidden, attention = found['hidden_states'], found['attention']
  n_layers = model.config.num_layers
  assert len(hidden) == len(ref_h) == n_layers + 1 and len(attention) == len(ref_a) == n_layers
  if model.causal:  # transformers' last hidden state of a pre-norm decoder has the final norm applied
    last = np.asarray(model.bind(params).final_norm(hidden[-1]))
    hidden = [*hidden[:-1], last]
  for i, (ours, theirs) in enumerate(zip(hidden, ref_h)):
    chex.assert_shape(ours, (2, 9, model.config.hidden_size))
    assert parity.relative_error(ours, theirs) < 1e-5, f'hidden state {i}'
  for i, (ours, theirs) in enumerate(zip(attention, ref_a)):
    chex.assert_shape(ours, (2, model.config.num_heads, 9, 9))
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-6, err_msg=f'attention {i}')
    np.testing.assert_allclose(np.asarray(ours).sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(attention[0])[1, :, :, -3:] == 0)
  # Asking for intermediates changes nothing else.
  np.testing.assert_array_equal(np.asarray(out), np.asarray(model.apply(params, jnp.asarray(tokens),
                                                                        attention_mask=jnp.asarray(mask))))


def _tiny_llama():
  model = models.Llama(models.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2,
                                          num_heads=4, num_kv_heads=2, max_position_embeddings=32))
  return model, model.init(jax.random.key(1))


@pytest.mark.slow
def test_remat_and_scan_give_the_same_values_and_gradients():
  model, params = _tiny_llama()
  tokens = jnp.asarray(_tokens(2, 6) % 40)

  def loss(p, remat, scan):
    logits, found = model.apply(p, tokens, remat=remat, scan=scan, intermediates=BOTH)
    hs = jnp.stack(list(found['hidden_states']))  # a tuple, or already one [L + 1, ...] array under scan
    att = jnp.stack(list(found['attention']))
    return jnp.sum(logits ** 2) * 1e-3 + jnp.sum(hs[1:] ** 2) + jnp.sum(att * jnp.arange(6.0))

  plain = model.apply(params, tokens, intermediates=BOTH)[1]
  scanned = model.apply(params, tokens, scan=True, intermediates=BOTH)[1]
  assert isinstance(plain['hidden_states'], tuple) and len(plain['hidden_states']) == 3
  chex.assert_shape(scanned['hidden_states'], (3, 2, 6, 16))
  chex.assert_shape(scanned['attention'], (2, 2, 4, 6, 6))
  for name in BOTH:
    chex.assert_trees_all_close(jnp.stack(list(scanned[name])), jnp.stack(list(plain[name])), rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(loss), static_argnums=(1, 2))
  reference = grad(params, False, False)
  assert np.abs(np.asarray(reference['layers'][0]['attn']['q_proj']['kernel'])).max() > 0
  for remat, scan in ((True, False), (False, True), (True, True)):
    grads = grad(params, remat, scan)
    chex.assert_trees_all_close(grads, reference, rtol=1e-4, atol=1e-6)


def test_one_kind_only_and_bad_names():
  model, params = _tiny_llama()
  tokens = jnp.asarray(_tokens(1, 5) % 40)
  _, found = model.apply(params, tokens, intermediates=('attention',))
  assert list(found) == ['attention']
  _, found = model.apply(params, tokens, scan=True, intermediates=('hidden_states',))
  assert list(found) == ['hidden_states']
  with pytest.raises(ValueError, match="'attentions'"):
    model.apply(params, tokens, intermediates=('attentions',))
