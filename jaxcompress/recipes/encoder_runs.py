"""Sentence-embedding encoder (MiniLM) runs: tokenized sentence batches, embedding fidelity, interleaved timing.
No flags here (the programs own theirs).

    ids, mask = encoder_runs.tokenize(tokenizer, texts, max_len=64)          # [N, T] int32 each
    data = encoder_runs.Sentences(ids, mask, batch_size=32, seed=0)          # fit's data: .batch(step)
    encoder_runs.fidelity(ref_emb, emb)                                      # {'cosine', 'nn_agreement'}
"""

from __future__ import annotations

import time

import jax
import numpy as np


class Sentences:
  """Batches of tokenized sentences by step (random access, as fit's data)."""

  def __init__(self, ids: np.ndarray, mask: np.ndarray, batch_size: int, seed: int):
    self.ids, self.mask, self.batch_size, self.seed = ids, mask, batch_size, seed

  def batch(self, step, *, process_index=0, process_count=1):
    n = len(self.ids)
    perm = np.random.RandomState([self.seed, step * self.batch_size // n]).permutation(n)
    local = self.batch_size // process_count
    pos = (step * self.batch_size + process_index * local + np.arange(local)) % n
    rows = perm[pos]
    # fit counts tokens by batch['targets']; an encoder has none, so it is the inputs (unused by the objective).
    return {'inputs': self.ids[rows], 'attention_mask': self.mask[rows], 'targets': self.ids[rows]}


def tokenize(tok, texts, max_len):
  """(ids, mask) [N, max_len] int32 of the texts, whitespace collapsed, padded and truncated to max_len."""
  enc = tok([' '.join(t.split()) for t in texts], padding='max_length', truncation=True, max_length=max_len,
            return_tensors='np')
  return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(np.int32)


def fidelity(t_emb: np.ndarray, s_emb: np.ndarray) -> dict:
  """Mean cosine of matching rows, and nearest-neighbour agreement within the set (self excluded)."""
  cos = float(np.mean(np.sum(t_emb * s_emb, -1)))
  def nn(e):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(-1)
  return {'cosine': cos, 'nn_agreement': float(np.mean(nn(t_emb) == nn(s_emb)))}


def time_ratio(fa, fb, repeats: int) -> tuple[float, float, float]:
  """Median seconds of fa and fb, timed interleaved, and median(fa) / median(fb)."""
  jax.block_until_ready(fa())
  jax.block_until_ready(fb())
  ta, tb = [], []
  for _ in range(repeats):
    for f, times in ((fa, ta), (fb, tb)):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times.append(time.perf_counter() - t0)
  a, b = float(np.median(ta)), float(np.median(tb))
  return a, b, a / b


