"""Prefill and decode speed of a ~1B Llama (random weights): float vs weight-only W8 vs W4 g128, as ratios.

    python experiments/benchmarks/decode.py                            # ~1.1B (Llama-3.2-1B shape, vocab 32000)
    python experiments/benchmarks/decode.py --width_scale 0.125 --layers 4    # a CPU size
    python experiments/benchmarks/decode.py --small                    # smoke size, seconds

Every block linear of the W8 model is `Quantized` 8-bit per output channel, of the W4 model 4-bit g128 packed
(asymmetric); embeddings, norms and the head stay float (float32 on CPU, bfloat16 on GPU/TPU). All three run the
same jitted code: `core.linear` -> `Quantized.matmul`, which on GPU/TPU sends small-batch calls (decode) to the
Pallas weight-only kernel (`jaxcompress.quantization.kernels.enable()`) and on CPU dequantizes inside jit then dots in
float32. Prefill: one forward pass of --batch x --seq_len tokens (8 x 512). Decode: greedy `models.generate`
with a KV cache, per-step time (time(N new) - time(1 new)) / (N - 1). The three models' calls are interleaved
round by round, so the printed ratios quantized / float hold on a shared host.

No GPU or TPU was available when this was written: the report's figures come from a 2-core CPU shared with
other work (there, prefill is the goal, >= 0.9x of float; CPU decode pays a full dequantization per step). The
script runs unchanged on a GPU.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import models, provenance, quantization

from experiments.benchmarks.benchlib import interleaved

_SCALE = flags.DEFINE_float('width_scale', 1.0, 'Multiplies hidden size, heads and MLP width of the 1B shape.')
_LAYERS = flags.DEFINE_integer('layers', 16, 'Transformer blocks.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Prefill sequences.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 512, 'Prefill tokens per sequence.')
_DECODE_BATCH = flags.DEFINE_integer('decode_batch', 1, 'Sequences decoded together.')
_PROMPT = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens before decoding.')
_NEW = flags.DEFINE_integer('new_tokens', 32, 'Greedy tokens generated per sequence.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved rounds after one warm-up call each.')
_SMALL = flags.DEFINE_boolean('small', False, 'Smoke size (explicit flags still win).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weights and tokens.')
_OUTPUT = flags.DEFINE_string('out', None, 'JSON results path (default: none).')
SMALL = {'width_scale': 1 / 32, 'layers': 2, 'batch': 2, 'seq_len': 64, 'prompt_len': 8, 'new_tokens': 8,
         'repeats': 3}


def config(scale: float, layers: int, max_len: int) -> models.LlamaConfig:
  """Llama-3.2-1B's shape (2048 wide, 32 heads of 64, 8 KV heads, MLP 8192) times `scale`, vocab 32000."""
  heads = max(1, round(32 * scale))
  return models.LlamaConfig(vocab_size=32000, hidden_size=64 * heads, intermediate_size=int(8192 * scale),
                            num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 4),
                            max_position_embeddings=max_len, tie_embeddings=True)


def main(argv):
  del argv
  quantization.kernels.enable()  # the Pallas weight-only kernel on GPU/TPU (CPU keeps dequantize-then-dot)
  if _SMALL.value:
    for k, v in SMALL.items():
      if not flags.FLAGS[k].present:
        flags.FLAGS[k].value = v
  dtype = jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  model = models.Llama(config(_SCALE.value, _LAYERS.value, max(_SEQ_LEN.value, _PROMPT.value + _NEW.value)))
  fp = jax.tree.map(lambda a: a.astype(dtype), jax.jit(model.init)(jax.random.key(_SEED.value)))

  def quantize(bits, gs):
    fit = lambda w: gs if gs is None or w.shape[0] % gs == 0 else None  # per-channel where 128 does not divide
    q = model.select(fp).map(lambda _, w: quantization.quantize_weight(w, bits=bits, group_size=fit(w)), fp)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, q)

  variants = {f'float ({jnp.dtype(dtype).name})': fp, 'W8 per-channel': quantize(8, None), 'W4 g128': quantize(4, 128)}
  n_params = sum(int(np.size(a)) for a in jax.tree.leaves(fp))
  rng = np.random.default_rng(_SEED.value)
  tokens = jnp.asarray(rng.integers(0, 32000, (_BATCH.value, _SEQ_LEN.value)), jnp.int32)
  prompt = jnp.asarray(rng.integers(0, 32000, (_DECODE_BATCH.value, _PROMPT.value)), jnp.int32)
  fwd = jax.jit(model.apply)
  prefill = interleaved({k: (lambda p=p: fwd(p, tokens)) for k, p in variants.items()}, _REPEATS.value)
  gen = {}
  for n in (1, _NEW.value):
    gen[n] = interleaved({k: (lambda p=p, n=n: models.generate(model, p, prompt, max_new_tokens=n))
                          for k, p in variants.items()}, _REPEATS.value)
  base = next(iter(variants))
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {n_params / 1e6:.1f}M parameters, '
        f'{model.config.num_layers} layers x {model.config.hidden_size} wide, load {os.getloadavg()[0]:.1f}')
  print(f'{"":18} {"prefill ms":>11} {"prefill vs float":>17} {"decode tok/s":>13} {"decode vs float":>16}')
  out = {}
  for k in variants:
    step = (gen[_NEW.value][k].median - gen[1][k].median) / (_NEW.value - 1)
    out[k] = {'prefill_s': prefill[k].median, 'prefill_speed_vs_float': prefill[base].median / prefill[k].median,
              'decode_step_s': step, 'decode_tokens_per_s': _DECODE_BATCH.value / step}
  for k, r in out.items():
    r['decode_speed_vs_float'] = r['decode_tokens_per_s'] / out[base]['decode_tokens_per_s']
    print(f'{k:18} {1e3 * r["prefill_s"]:11.1f} {r["prefill_speed_vs_float"]:17.3f} '
          f'{r["decode_tokens_per_s"]:13.1f} {r["decode_speed_vs_float"]:16.3f}')
  print(f'prefill {_BATCH.value}x{_SEQ_LEN.value}; decode batch {_DECODE_BATCH.value}, prompt {_PROMPT.value}, '
        f'{_NEW.value} new tokens; {_REPEATS.value} interleaved rounds')
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(_OUTPUT.value).write_text(json.dumps({
        'flags': {k: flags.FLAGS[k].value for k in (*SMALL, 'decode_batch', 'seed')}, 'dtype': jnp.dtype(dtype).name,
        'backend': jax.default_backend(), 'num_params': n_params, 'results': out,
        'environment': provenance.environment()}, indent=1))


if __name__ == '__main__':
  app.run(main)
