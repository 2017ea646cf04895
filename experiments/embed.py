"""Main job: load all-MiniLM-L6-v2 from its package, embed sentences, compress, and print the size tables.

    python experiments/embed.py                       # the embedded default
    python experiments/embed.py --sparsity=0.5 --bits=4 --sentences="one" --sentences="two"

The toy compression (magnitude masks on the MLP kernels, 4-bit round-to-nearest on the attention kernels)
shows the vocabulary at work; the size table and the embedding fidelity say what it cost.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, models, provenance
from jaxcompress.eval import fidelity

DEFAULT_SENTENCES = (
    'The cat sat quietly on the warm windowsill.',
    'A kitten was resting on the sunny window ledge.',
    'Neural networks can be compressed by pruning unimportant weights.',
    'Removing small weights makes a neural network smaller.',
    'The stock market fell sharply after the announcement.',
    'Rain is expected to continue through the weekend.',
)

flags.DEFINE_multi_string('sentences', list(DEFAULT_SENTENCES), 'Sentences to embed.')
flags.DEFINE_float('sparsity', 0.5, 'Fraction of each MLP kernel zeroed by magnitude.', lower_bound=0.0,
                   upper_bound=0.99)
flags.DEFINE_integer('bits', 4, 'Bits of the round-to-nearest attention kernels (0: leave them dense).',
                     lower_bound=0, upper_bound=8)
flags.DEFINE_integer('group_size', 64, 'Rows per quantization group.')
flags.DEFINE_string('out', 'runs/embed', 'Directory for the results JSON.')
FLAGS = flags.FLAGS


def magnitude_mask(w: jax.Array, sparsity: float) -> core.Masked:
  """Keep the largest-|w| entries of the whole kernel."""
  k = int(round(sparsity * w.size))
  threshold = jnp.sort(jnp.abs(w).ravel())[k - 1] if k else -1.0
  return core.Masked(w, jnp.abs(w) > threshold)


def compress(params, sparsity: float, bits: int, group_size: int):
  mlp = core.select(params, include=r'mlp/.*/kernel$')
  params = mlp.map(lambda _, w: magnitude_mask(w, sparsity), params)
  if bits:
    attn = core.select(params, include=r'attn/.*/kernel$')
    params = attn.map(lambda _, w: core.quantize(w, bits=bits, group_size=group_size), params)
  return params


def main(argv):
  del argv
  import transformers
  path = models.minilm_dir()
  model, params = models.from_pretrained(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
  batch = tokenizer(FLAGS.sentences, padding=True, return_tensors='np')
  tokens, mask = jnp.asarray(batch['input_ids']), jnp.asarray(batch['attention_mask'])
  embed = jax.jit(model.sentence_embedding)

  dense_emb = embed(params, tokens, mask)
  print(f'all-MiniLM-L6-v2 from {path}')
  print(f'{len(FLAGS.sentences)} sentences -> embeddings {tuple(dense_emb.shape)}\n')
  print('cosine similarity:')
  sim = np.asarray(dense_emb @ dense_emb.T)
  for i, s in enumerate(FLAGS.sentences):
    print(f'  [{i}] ' + ' '.join(f'{v:5.2f}' for v in sim[i]) + f'   {s[:50]}')
  print('\nsize (dense):')
  print(model.summary(params, seq_len=tokens.shape[1], by='total'))

  small = compress(params, FLAGS.sparsity, FLAGS.bits, FLAGS.group_size)
  small_emb = embed(small, tokens, mask)
  cos = fidelity.embedding_cosine(dense_emb, small_emb)
  summary = model.summary(small, seq_len=tokens.shape[1], baseline=params)
  print(f'\nsize (MLP {FLAGS.sparsity:.0%} magnitude-sparse, attention {FLAGS.bits or "dense"}-bit):')
  print(summary)
  print(f"\nembedding cosine to the dense model: mean {float(cos.mean):.5f}, min {float(cos.min):.5f}")

  results = {"summary": summary.as_dict(), "cosine_mean": float(cos.mean), "cosine_min": float(cos.min),
             'similarity': sim.tolist()}
  run_dir = provenance.write_run_dir(FLAGS.out, config=FLAGS.flag_values_dict(), results=results)
  print(f'\nresults: {run_dir}/results.json')


if __name__ == '__main__':
  app.run(main)
