"""Prints how closely jaxcompress reproduces transformers: the numbers behind the parity tests.

    python -m experiments.tables.parity     # from the repository root (it uses tests/reference_models.py);
                                            # needs torch: pip install -e '.[test,demo]'

1. For each family, a tiny random transformers model is saved as safetensors, loaded here, and run on the
   same tokens in float32: relative error of our logits (hidden states for BertModel), and after exporting
   back with save_pretrained, the largest difference between the reloaded and the original torch outputs.
2. The real all-MiniLM-L6-v2: cosine between our mean-pooled sentence embeddings and transformers' on
   24 sentences.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')

import jax
import jax.numpy as jnp
import numpy as np
from absl import app

from jaxcompress import models

try:
  from tests import reference_models as parity
except ImportError as e:
  raise SystemExit('experiments/tables/parity.py builds its reference models with tests/reference_models.py: run '
                   'it from the repository root as `python -m experiments.tables.parity`.') from e

SENTENCES = [
    'The cat sat quietly on the warm windowsill.', 'A small dog barked at the mail carrier every morning.',
    'Quantum computers exploit superposition to explore many states at once.',
    'She poured a cup of coffee and opened the newspaper.', 'The stock market fell sharply after the announcement.',
    'Rain is expected to continue through the weekend.', 'He learned to play the violin when he was seven.',
    'The recipe calls for two cups of flour and a pinch of salt.',
    'Neural networks can be compressed by pruning unimportant weights.', 'The museum opens at nine and closes at five.',
    'Our flight was delayed by three hours because of fog.', 'Photosynthesis converts sunlight into chemical energy.',
    'The children built a sandcastle near the water.', 'Please remember to lock the door when you leave.',
    'The committee postponed its decision until next month.', 'A gentle breeze carried the smell of pine.',
    'Low-rank factorization approximates a matrix with two thin ones.', 'The library will be closed this summer.',
    'He fixed the bicycle chain with a pair of pliers.', 'The orchestra tuned their instruments.',
    'Volcanoes release gases and ash into the atmosphere.', 'I forgot my umbrella at the restaurant last night.',
    'The new bridge shortens the commute by twenty minutes.',
    'Knowledge distillation trains a small student to mimic a large teacher.',
]


def family_parity() -> None:
  jax.config.update('jax_default_matmul_precision', 'highest')
  tokens = np.random.RandomState(0).randint(0, parity.VOCAB, (2, 12))
  print(f'{"family":<11} {"our class":<6} {"rel. error":>11} {"export: max |diff|":>19}')
  for kind in parity.ALL_KINDS:
    ref = parity.tiny_reference(kind)
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as dst:
      ref.save_pretrained(src)
      model, params = models.from_pretrained(src)
      err = parity.relative_error(model.apply(params, jnp.asarray(tokens)), parity.torch_outputs(ref, tokens))
      models.save_pretrained(dst, model, params)
      back = type(ref).from_pretrained(dst).eval()
      diff = np.abs(parity.torch_outputs(back, tokens) - parity.torch_outputs(ref, tokens)).max()
    print(f'{kind:<11} {type(model).__name__:<6} {err:>11.2e} {diff:>19.1e}')


def minilm_parity() -> None:
  import torch
  import transformers
  path = models.minilm_dir()
  model, params = models.from_pretrained(path)
  batch = transformers.AutoTokenizer.from_pretrained(str(path))(SENTENCES, padding=True, return_tensors='np')
  ours = np.asarray(model.sentence_embedding(params, jnp.asarray(batch['input_ids']),
                                             jnp.asarray(batch['attention_mask']),
                                             token_types=jnp.asarray(batch['token_type_ids'])))
  with torch.no_grad():
    h = transformers.BertModel.from_pretrained(str(path)).eval()(
        **{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
    m = torch.tensor(batch['attention_mask'])[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
  cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
  print(f'\nall-MiniLM-L6-v2, {len(SENTENCES)} sentences: embedding cosine to transformers min {cos.min():.7f}, '
        f'mean {cos.mean():.7f}')


def main(argv):
  del argv
  import transformers
  transformers.utils.logging.disable_progress_bar()
  family_parity()
  minilm_parity()


if __name__ == '__main__':
  app.run(main)
