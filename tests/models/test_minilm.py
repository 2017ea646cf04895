"""The real all-MiniLM-L6-v2 checkpoint: our sentence embeddings against transformers and sentence-transformers."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxcompress import models
from tests.reference_models import relative_error

TOL = 3e-6  # fp32 relative error of the unit embeddings over 6 layers; observed 7.8e-7 (8.8e-7 per row)

SENTENCES = [
    'The cat sat quietly on the warm windowsill.',
    'A small dog barked at the mail carrier every morning.',
    'Quantum computers exploit superposition to explore many states at once.',
    'She poured a cup of coffee and opened the newspaper.',
    'The stock market fell sharply after the announcement.',
    'Rain is expected to continue through the weekend.',
    'He learned to play the violin when he was seven years old.',
    'The recipe calls for two cups of flour and a pinch of salt.',
    'Neural networks can be compressed by pruning unimportant weights.',
    'The museum opens at nine and closes at five.',
    'Our flight was delayed by three hours because of fog.',
    'Photosynthesis converts sunlight into chemical energy.',
    'The children built a sandcastle near the water.',
    'Please remember to lock the door when you leave.',
    'The committee postponed its decision until next month.',
    'A gentle breeze carried the smell of pine through the valley.',
    'Low-rank factorization approximates a matrix with two thin ones.',
    'The library will be closed for renovations this summer.',
    'He fixed the bicycle chain with a pair of pliers.',
    'The orchestra tuned their instruments before the concert.',
    'Volcanoes release gases and ash into the atmosphere.',
    'I forgot my umbrella at the restaurant last night.',
    'The new bridge shortens the commute by twenty minutes.',
    'Knowledge distillation trains a small student to mimic a large teacher.',
]


@pytest.fixture(scope='module')
def minilm():
  path = models.minilm_dir()
  model, params = models.from_pretrained(path)
  tok = transformers.AutoTokenizer.from_pretrained(str(path))
  batch = tok(SENTENCES, padding=True, return_tensors='np')
  return path, model, params, batch


def test_loads_as_bert_with_pooler(minilm):
  _, model, params, _ = minilm
  assert type(model) is models.Bert
  assert (model.config.num_layers, model.config.hidden_size, model.config.pooler) == (6, 384, True)
  hf = transformers.BertModel.from_pretrained(str(minilm[0]))
  assert model.summary(params).total.params == sum(p.numel() for p in hf.parameters())  # 22.7M


def test_embeddings_match_transformers(minilm):
  path, model, params, batch = minilm
  ours = np.asarray(model.sentence_embedding(params, jnp.asarray(batch['input_ids']),
                                             jnp.asarray(batch['attention_mask']),
                                             token_types=jnp.asarray(batch['token_type_ids'])))
  hf = transformers.BertModel.from_pretrained(str(path)).eval()
  with torch.no_grad():
    h = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
    m = torch.tensor(batch['attention_mask'])[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
  assert len(ours) >= 20
  errors = [relative_error(a, b) for a, b in zip(ours, ref)]
  assert max(errors) <= TOL, max(errors)


def test_embeddings_match_sentence_transformers(minilm):
  sentence_transformers = pytest.importorskip('sentence_transformers')
  path, model, params, batch = minilm
  ref = sentence_transformers.SentenceTransformer(str(path), device='cpu').encode(SENTENCES)
  ours = np.asarray(model.sentence_embedding(params, jnp.asarray(batch['input_ids']),
                                             jnp.asarray(batch['attention_mask'])))
  errors = [relative_error(a, b) for a, b in zip(ours, ref)]
  assert max(errors) <= TOL, max(errors)
  # Paraphrase structure survives: the two sentences about compression are each other's nearest ML neighbours.
  sim = ours @ ours.T
  assert sim[8, 16] > sim[8, 3] and sim[16, 23] > sim[16, 13]
