"""Causal-LM runs the distillation and architecture programs share: a teacher and its data, held-out NLL, and one
`fit` run with a fixed recipe. No flags here (the programs own theirs).

    from jaxcompress.recipes import lm_runs
    teacher, params, train, valid = lm_runs.fixture_setup('fixture', batch_size=16)   # or lm_runs.small_setup(0)
    params, seconds = lm_runs.train('run', teacher, params, objective, train, steps=100, lr=1e-3, seed=0, out=out)
    nll = lm_runs.heldout_nll(teacher, params, valid)
"""

from __future__ import annotations

import pathlib
import time

import jax
import numpy as np

from jaxcompress import models
from jaxcompress.data import pipeline
from jaxcompress.eval import rows_perplexity
from jaxcompress.train import loop, optim


def small_setup(seed: int):
  """A tiny random Llama teacher (4 layers) with random-token training batches and held-out rows."""
  cfg = models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                           num_kv_heads=2, max_position_embeddings=64, tie_embeddings=True)
  teacher = models.Llama(cfg)
  params = teacher.init(jax.random.key(seed))
  rows = np.asarray(jax.random.randint(jax.random.key(seed + 1), (48, 17), 0, 64), np.int32)
  return teacher, params, pipeline.LMBatches(sequences=rows[:32], batch_size=8, seed=seed), rows[32:]


def fixture_setup(name: str, batch_size: int):
  """(model, params, train LMBatches, held-out rows) of the fixture or a checkpoint trained like it."""
  from jaxcompress.recipes import fixture
  teacher, params = fixture.load(name)
  _, train, valid = fixture.data(fixture.resolve(name), batch_size=batch_size)
  return teacher, params, train, valid


def heldout_nll(model, params, rows: np.ndarray, batch: int = 16) -> float:
  """Mean next-token NLL (nats) over the held-out rows [N, T + 1]."""
  return rows_perplexity(model, params, rows, batch_size=batch).mean_nll


def train(name, model, params, objective, data, *, steps, lr, seed, out: pathlib.Path, frozen=None):
  """(params after `steps` of AdamW on `objective`, seconds); the run goes to out/runs/name."""
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=lr, warmup_steps=max(steps // 10, 1),
                                                   total_steps=steps, weight_decay=0.01))
  cfg = loop.LoopConfig(steps=steps, batch_size=data.batch_size, run_dir=str(out / 'runs' / name), seed=seed,
                        checkpoint_every=0, keep_checkpoints=1, async_checkpoint=False, progress=False,
                        resume=False, log_every=max(steps // 5, 1))
  t0 = time.perf_counter()
  result = loop.fit(cfg, model=model, params=params, objective=objective, optimizer=opt, data=data,
                    frozen=frozen)
  return result.state.params, time.perf_counter() - t0
