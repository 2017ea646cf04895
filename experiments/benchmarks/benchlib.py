"""What the benchmark scripts share: timing of device work and the memory a compiled program needs.

The scripts import this as `benchlib` (their own folder is first on sys.path when run as scripts).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call over repeated calls."""

  times: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  def as_dict(self) -> dict[str, Any]:
    return {'median_s': self.median, 'min_s': min(self.times), 'max_s': max(self.times),
            'spread_pct': 100 * (max(self.times) - min(self.times)) / self.median, 'times_s': list(self.times)}


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
  """(result, seconds) of fn(*args), waited on until the result is ready."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def time_calls(fn: Callable[[], Any], repeats: int) -> Timing:
  """One untimed warm-up call, then `repeats` timed calls, each waited on until its result is ready."""
  jax.block_until_ready(fn())
  return Timing(tuple(timed(fn)[1] for _ in range(repeats)))


def memory_need(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled program: arguments + outputs + temporaries - aliased (donated) buffers."""
  m = compiled.memory_analysis()
  out = {'argument': m.argument_size_in_bytes, 'output': m.output_size_in_bytes, 'temp': m.temp_size_in_bytes,
         'alias': m.alias_size_in_bytes, 'generated_code': m.generated_code_size_in_bytes}
  out['total'] = out['argument'] + out['output'] + out['temp'] - out['alias']
  return out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
  """Each fn warmed up once, then `repeats` rounds that call every fn once in turn, so that load from other work
  on a shared host falls on all of them alike and their ratios stay meaningful."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      times[k].append(timed(fn)[1])
  return {k: Timing(tuple(v)) for k, v in times.items()}


def _random(hidden: int, intermediate: int, layers: int, small: bool):
  from jaxcompress import models
  heads = max(hidden // 64, 1)
  cfg = models.LlamaConfig(vocab_size=256 if small else 4096, hidden_size=hidden, intermediate_size=intermediate,
                           num_layers=layers, num_heads=heads, num_kv_heads=heads, max_position_embeddings=1024)
  model = models.Llama(cfg)
  return model, jax.jit(model.init)(jax.random.key(0))


def forward_models(small: bool):
  """(name, model, params) of the forward benchmarks: the fixture, a random 768 / 3072 Llama and all-MiniLM-L6-v2,
  or with `small` one tiny random Llama."""
  if small:
    yield 'random 64 / 192, 2 layers', *_random(64, 192, 2, True)
    return
  from jaxcompress.recipes import fixture
  yield 'fixture 256 / 768, 4 layers', *fixture.load('fixture')
  yield 'random 768 / 3072, 4 layers', *_random(768, 3072, 4, False)
  yield 'all-MiniLM-L6-v2 384 / 1536', *fixture.load('minilm')
