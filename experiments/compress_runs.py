"""What the low-rank and sharing tables share: the model and its data, held-out perplexity, a recovery run.

    model, params, train, valid = compress_runs.model_and_data('fixture', small=False, seed=0)
    ppl = compress_runs.perplexity(model, params, valid)
    params = compress_runs.recover(model, params, train, steps=100, run_dir=..., trainable=...)
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import numpy as np


def model_and_data(name: str, *, small: bool, seed: int, data_dir: str | None = None):
  """(model, params, train LMBatches, held-out rows [N, T + 1]); `small`: a random 2-layer Llama on random
  tokens (a smoke run in seconds)."""
  import jax

  from jaxcompress import models
  from jaxcompress.data import pipeline
  from jaxcompress.train import loop

  if small:
    model = models.Llama(models.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                                            num_heads=4, num_kv_heads=2, max_position_embeddings=64))
    params = jax.jit(model.init)(loop.rng_stream(seed, 'init'))
    rows = np.random.RandomState(seed).randint(0, 64, (48, 17)).astype(np.int32)
    return model, params, pipeline.LMBatches(sequences=rows[:40], batch_size=4, seed=seed), rows[40:]
  from experiments import fixture
  model, params = fixture.load(name)
  directory = data_dir or fixture.resolve(name)
  _, train, valid = fixture.data(directory)
  return model, params, train, valid


def perplexity(model, params, valid: np.ndarray, batch_size: int = 16) -> float:
  """Held-out perplexity over every token of the rows (the fixture's own evaluation)."""
  from jaxcompress.eval import lm
  return lm.rows_perplexity(model, params, valid, batch_size=batch_size).perplexity


def calibration_batches(train, n: int) -> list[dict[str, np.ndarray]]:
  """n training batches as calibration input ({'tokens'} for the calibration driver; inputs/targets too)."""
  out = []
  for step in range(n):
    b = train.batch(step)
    out.append({'tokens': b['inputs'], 'inputs': b['inputs'], 'targets': b['targets']})
  return out


def recover(model, params, train, *, steps: int, run_dir: pathlib.Path, seed: int, trainable=None,
            learning_rate: float = 1e-3, batch_size: int | None = None) -> Any:
  """params after `steps` of causal-LM fine-tuning with loop.fit (a fresh run in run_dir each time);
  batch_size: rows per step (default the training batches' own)."""
  import dataclasses

  from jaxcompress.train import loop, objectives, optim, state
  if steps <= 0:
    return params
  if batch_size:
    train = dataclasses.replace(train, batch_size=batch_size)
  shutil.rmtree(run_dir, ignore_errors=True)
  cfg = loop.LoopConfig(steps=steps, batch_size=train.batch_size, run_dir=str(run_dir), seed=seed,
                        checkpoint_every=0, async_checkpoint=False, progress=False, log_every=max(1, steps // 4),
                        mesh=(1, 1, 1))
  opt = optim.make_optimizer(optim.OptimizerConfig(learning_rate=learning_rate, warmup_steps=min(10, steps // 5),
                                                   total_steps=steps))
  result = loop.fit(cfg, model=model, params=params, objective=objectives.causal_lm(model), optimizer=opt,
                    data=train, trainable=trainable or state.floating)
  return result.state.params


def markdown(rows: list[dict], columns: list[str]) -> str:
  def cell(v):
    return f'{v:.2f}' if isinstance(v, float) else str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c, '')) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def write(output_dir: str, config: dict, rows: list[dict], table: str, extra: dict | None = None) -> None:
  """results.json ({'rows': rows, **extra}) with provenance, and table.md; prints the table."""
  from jaxcompress import provenance
  out = pathlib.Path(output_dir)
  provenance.write_run_dir(out, config=config, results={'rows': rows, **(extra or {})})
  (out / 'table.md').write_text(table + '\n')
  print(table)
  print(f'results: {out / "results.json"}')
