"""Forward (prefill) and KV-cache decode throughput of a random Llama-family model of about 100M parameters.

    python experiments/benchmarks/forward.py                          # ~100M params, float32, default backend
    python experiments/benchmarks/forward.py --dtype bfloat16 --batch 32 --seq_len 2048   # a GPU setting
    python experiments/benchmarks/forward.py --small                  # smoke size, seconds

Compilation is timed apart from execution: the forward pass is compiled ahead of time; `models.generate`
compiles on its first call, reported as "first call". Every timed call ends in `jax.block_until_ready`, runs
--repeats times after one warm-up, and is summarized by its median and min-max spread. Decode throughput is
per generated token, without the prompt: (time(N new tokens) - time(1 new token)) / (N - 1) per step.
Results, with config, versions, device and git revision, go to --out as JSON.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, models, provenance

from experiments.benchmarks.benchlib import time_calls

_VOCAB = flags.DEFINE_integer('vocab', 32000, 'Vocabulary size.')
_HIDDEN = flags.DEFINE_integer('hidden', 768, 'Hidden size d_model.')
_LAYERS = flags.DEFINE_integer('layers', 12, 'Number of transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 12, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 4, 'Key/value heads (grouped-query attention).')
_INTERMEDIATE = flags.DEFINE_integer('intermediate', 2048, 'SwiGLU MLP width.')
_TIE = flags.DEFINE_boolean('tie_embeddings', True, 'Tie the output head to the token embedding '
                            '(default config: 100.1M parameters tied, 124.7M untied).')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per forward pass.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 512, 'Tokens per sequence in the forward pass.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', None, 'Sequences decoded together (default: --batch).')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 64, 'Prompt tokens before decoding.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'Tokens generated per sequence (greedy, KV cache).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per measurement, after one warm-up call.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Parameter and activation dtype.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random parameters and tokens.')
_SMALL = flags.DEFINE_boolean('small', False, 'Smoke size: a tiny model and short sequences (flags given '
                              'explicitly still win).')
_OUT = flags.DEFINE_string('out', None, 'JSON results path (default: runs/benchmarks/forward_<time>.json).')

# --small: values used for every flag not given on the command line.
SMALL = {'vocab': 1024, 'hidden': 128, 'layers': 2, 'heads': 4, 'kv_heads': 2, 'intermediate': 256,
         'batch': 2, 'seq_len': 64, 'prompt_len': 16, 'new_tokens': 16, 'repeats': 3}


def config_from_flags() -> models.LlamaConfig:
  return models.LlamaConfig(vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, num_layers=_LAYERS.value,
                            num_heads=_HEADS.value, num_kv_heads=_KV_HEADS.value,
                            intermediate_size=_INTERMEDIATE.value, tie_embeddings=_TIE.value,
                            max_position_embeddings=max(_SEQ_LEN.value, _PROMPT_LEN.value + _NEW_TOKENS.value))


def matmul_flops_per_token(model: models.Llama, params: models.Params, seq_len: int) -> int:
  """Forward FLOPs per token: 2 per kernel weight, plus attention scores/values and a tied head."""
  flat = core.flatten(params)
  weights = sum(int(np.prod(flat[p].shape)) for p in model.linear_paths(params))
  return 2 * weights + sum(model.flops_per_token(params, seq_len).values())


def bench_forward(model: models.Llama, params: models.Params, batch: int, seq_len: int, repeats: int,
                  rng: np.random.RandomState) -> dict[str, Any]:
  tokens = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, seq_len)), jnp.int32)
  start = time.perf_counter()
  compiled = jax.jit(lambda p, t: model.apply(p, t)).lower(params, tokens).compile()
  compile_s = time.perf_counter() - start
  timing = time_calls(lambda: compiled(params, tokens), repeats)
  tokens_per_call = batch * seq_len
  flops = matmul_flops_per_token(model, params, seq_len) * tokens_per_call
  return {'batch': batch, 'seq_len': seq_len, 'compile_s': compile_s, **timing.as_dict(),
          'tokens_per_s': tokens_per_call / timing.median,
          'tokens_per_s_range': [tokens_per_call / max(timing.times), tokens_per_call / min(timing.times)],
          'gflop_per_s': flops / timing.median / 1e9}


def bench_decode(model: models.Llama, params: models.Params, batch: int, prompt_len: int, new_tokens: int,
                 repeats: int, rng: np.random.RandomState) -> dict[str, Any]:
  if new_tokens < 2:
    raise ValueError(f'--new_tokens={new_tokens}: per-step decode time needs at least 2 new tokens.')
  prompt = jnp.asarray(rng.randint(0, model.config.vocab_size, (batch, prompt_len)), jnp.int32)
  first_call, timings = {}, {}
  for n in (1, new_tokens):
    run = lambda n=n: models.generate(model, params, prompt, max_new_tokens=n)
    start = time.perf_counter()
    jax.block_until_ready(run())
    first_call[n] = time.perf_counter() - start
    timings[n] = time_calls(run, repeats)
  full, one = timings[new_tokens], timings[1]
  step_s = (full.median - one.median) / (new_tokens - 1)
  return {'batch': batch, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
          'first_call_s': first_call[new_tokens], 'first_call_one_token_s': first_call[1],
          'generate': full.as_dict(), 'generate_one_token': one.as_dict(),
          'step_ms': 1e3 * step_s, 'tokens_per_s': batch / step_s,
          'end_to_end_new_tokens_per_s': batch * new_tokens / full.median}


def apply_small_defaults() -> None:
  for name, value in SMALL.items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def print_table(result: dict[str, Any]) -> None:
  fwd, dec = result['forward'], result['decode']
  gen = dec['generate']
  rows = [
      ('forward ms / batch', f'{1e3 * fwd["median_s"]:.1f}', f'{1e3 * fwd["min_s"]:.1f} - {1e3 * fwd["max_s"]:.1f}'),
      ('forward tokens / s', f'{fwd["tokens_per_s"]:,.0f}',
       f'{fwd["tokens_per_s_range"][0]:,.0f} - {fwd["tokens_per_s_range"][1]:,.0f}'),
      ('forward GFLOP / s', f'{fwd["gflop_per_s"]:,.1f}', ''),
      ('generate s / call', f'{gen["median_s"]:.3f}', f'{gen["min_s"]:.3f} - {gen["max_s"]:.3f}'),
      ('decode ms / step', f'{dec["step_ms"]:.2f}', ''),
      ('decode tokens / s', f'{dec["tokens_per_s"]:,.0f}', ''),
      ('generate new tokens / s', f'{dec["end_to_end_new_tokens_per_s"]:,.0f}', '(prompt included)'),
      ('compile forward s', f'{fwd["compile_s"]:.1f}', ''),
      ('generate first call s', f'{dec["first_call_s"]:.1f}', '(compile + run)'),
  ]
  print(f'\n{result["num_params"]:,} parameters, {result["dtype"]}, {result["device_kind"]} '
        f'({result["backend"]}), forward {fwd["batch"]}x{fwd["seq_len"]}, decode {dec["batch"]}x'
        f'({dec["prompt_len"]}+{dec["new_tokens"]}), {len(gen["times_s"])} repeats')
  width = max(len(r[0]) for r in rows)
  print(f'{"":{width}}  {"median":>12}  spread (min - max)')
  for name, median, spread in rows:
    print(f'{name:{width}}  {median:>12}  {spread}'.rstrip())


def main(argv: list[str]) -> None:
  del argv
  if _SMALL.value:
    apply_small_defaults()
  dtype = jnp.dtype(_DTYPE.value)
  load_before = os.getloadavg()  # other work on a shared host shows up as spread
  devices = jax.devices()
  print(f'jax {jax.__version__}, flax {flax.__version__}, devices: {devices}')

  model = models.Llama(config_from_flags())
  params = jax.jit(model.init)(jax.random.key(_SEED.value))
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  print(f'model: {num_params:,} parameters ({num_params / 1e6:.1f}M), {dtype.name}, {model.config}')

  rng = np.random.RandomState(_SEED.value)
  print(f'forward: batch {_BATCH.value} x {_SEQ_LEN.value} tokens ...', flush=True)
  forward = bench_forward(model, params, _BATCH.value, _SEQ_LEN.value, _REPEATS.value, rng)
  print(f'  compile {forward["compile_s"]:.1f} s, {1e3 * forward["median_s"]:.1f} ms / batch, '
        f'{forward["tokens_per_s"]:,.0f} tokens/s', flush=True)
  decode_batch = _DECODE_BATCH.value or _BATCH.value
  print(f'decode: batch {decode_batch}, prompt {_PROMPT_LEN.value}, {_NEW_TOKENS.value} new tokens ...',
        flush=True)
  decode = bench_decode(model, params, decode_batch, _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value, rng)
  print(f'  first call {decode["first_call_s"]:.1f} s, {decode["step_ms"]:.2f} ms / step, '
        f'{decode["tokens_per_s"]:,.0f} tokens/s', flush=True)

  now = datetime.datetime.now(datetime.timezone.utc)
  result = {
      'benchmark': 'forward', 'time_utc': now.isoformat(timespec='seconds'),
      'config': dataclasses.asdict(model.config), 'num_params': num_params, 'dtype': dtype.name,
      'flags': {name: flags.FLAGS[name].value for name in (*SMALL, 'decode_batch', 'dtype', 'seed', 'small',
                                                           'tie_embeddings')},
      'backend': jax.default_backend(), 'devices': [str(d) for d in devices], 'device_kind': devices[0].device_kind,
      'environment': provenance.environment(),
      'host': {'cpus': os.cpu_count(), 'load_avg_1m_before': load_before[0], 'load_avg_1m_after': os.getloadavg()[0]},
      'forward': forward, 'decode': decode,
  }
  print_table(result)
  out = pathlib.Path(_OUT.value) if _OUT.value else (
      REPO / 'runs' / 'benchmarks' / f'forward_{now.strftime("%Y%m%d_%H%M%S")}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  provenance.write_json(out, result)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  app.run(main)
