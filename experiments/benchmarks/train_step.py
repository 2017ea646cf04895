"""Tokens/s and model-FLOPs utilisation (MFU) of the training step, against a matmul rate measured in the run.

    python experiments/benchmarks/train_step.py --model gpt2_124m                 # CPU: batch 4 x 128, float32
    python experiments/benchmarks/train_step.py --model llama_1b                  # CPU: batch 1 x 128, remat
    python experiments/benchmarks/train_step.py --model llama_1b --batch 8 --seq_len 2048 \
        --compute_dtype bfloat16 --remat                                          # a GPU setting

What is timed is the engine's own step: `step.make_train_step(objectives.causal_lm(model, remat=...),
optim.make_optimizer(...))`, jitted by `step.compile_step` with `sharding.state_shardings` on a
`sharding.make_mesh` mesh (all devices on 'data', or --fsdp of them on 'fsdp'). It is lowered and compiled
ahead of time from abstract shapes (compile time reported apart), its memory need is read from the compiled
program before anything is allocated, then it runs --warmup untimed steps and --repeats timed steps, each
ended by `jax.block_until_ready` and followed by one timed call of each candidate peak matmul (interleaved, so
that on a shared host both see the same load); the summary is the median and min-max spread.

Model FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B; the Chinchilla convention with the head
counted and embedding lookups not):

    6 * N  +  12 * L * H * Q * T

N: weights of every matmul (block kernels plus the output head d x vocab, tied or not; no embeddings, biases
or norms), L layers, H query heads of width Q, T the sequence length. 6 = 2 (multiply-add) x 3 (forward, then
two backward matmuls); 12 L H Q T is the attention scores and values over the full T x T square, as PaLM
counts them. The causal-exact count, 3 x the forward FLOPs of `model.summary(params, seq_len=T).total.flops`
(attention over (T + 1) / 2 keys on average), is printed beside it as a cross-check: the two differ by
exactly 6 * L * H * Q * (T - 1). Hardware FLOPs add the forward pass that remat recomputes per block
(2 * N_blocks + 4 * L * H * Q * T); their ratio to the peak is the HFU.

MFU = achieved model FLOP/s / peak. The peak is measured in the same process, on the same device and in the
compute dtype: the fastest (by median) of three dense `jnp.matmul`s, a square n x n x n (--matmul_size: 8192
on GPU/TPU, 4096 on CPU), and the step's own largest block matmul and head matmul at its per-device rows
(on a CPU these thinner shapes can outrun a large square), times the device count. So the report reads
"MFU 0.xx of the measured matmul rate", not of a datasheet number.

Memory on one host: llama_1b (1.10B parameters) with AdamW holds 12.3 GiB of float32 weights and moments;
with its blocks run as a scan (one block's temporaries at a time) and remat, the compiled step needs 20.5 GiB
at batch 1 x 128, which a 24 GiB host just holds. A step whose compiled need exceeds the memory available
stops before allocating, and says so.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from jaxcompress import core, models, provenance
from jaxcompress.train import objectives, optim, sharding
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib

from experiments.benchmarks.benchlib import Timing, memory_need, timed

# name -> (model, defaults for the flags left unset on the command line)
PRESETS: dict[str, tuple[Callable[[], models.Model], dict[str, Any]]] = {
    # GPT-2 small: 12 layers, 768 wide, 12 heads, vocab 50257, 1024 positions, head tied to the embedding.
    'gpt2_124m': (lambda: models.GPT2(models.GPT2Config()),
                  {'batch': 4, 'seq_len': 128, 'remat': False, 'scan_layers': False, 'optimizer': 'adamw',
                   'cpu_optimizer': 'adamw'}),
    # TinyLlama-1.1B shapes: 22 layers, 2048 wide, 32 heads (4 key/value), SwiGLU 5632, vocab 32000, untied.
    'llama_1b': (lambda: models.Llama(models.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
        max_position_embeddings=2048)),
                 {'batch': 1, 'seq_len': 128, 'remat': True, 'scan_layers': True, 'optimizer': 'adamw',
                  'cpu_optimizer': 'adamw'}),
}

_MODEL = flags.DEFINE_enum('model', 'gpt2_124m', list(PRESETS), 'Model configuration.')
_BATCH = flags.DEFINE_integer('batch', None, 'Global sequences per step (default: per model, see PRESETS).')
_SEQ_LEN = flags.DEFINE_integer('seq_len', None, 'Tokens per sequence (default: per model).')
_COMPUTE_DTYPE = flags.DEFINE_enum('compute_dtype', None, ['float32', 'bfloat16'],
                                   'Forward/backward dtype over float32 master weights (default: bfloat16 on '
                                   'GPU/TPU, float32 on CPU). The peak matmul is timed in the same dtype.')
_REMAT = flags.DEFINE_boolean('remat', None, 'Recompute each block in the backward pass (default: per model).')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step (gradient accumulation).')
_SCAN = flags.DEFINE_boolean('scan_layers', None, 'Run the blocks as one lax.scan (default: per model).')
_OPTIMIZER = flags.DEFINE_enum('optimizer', None, list(optim.OPTIMIZERS), 'Optimizer (optim.make_optimizer; '
                               'default: adamw, except llama_1b on CPU: sgd, see the module docstring).')
_FSDP = flags.DEFINE_integer('fsdp', 1, "Devices on the mesh's 'fsdp' axis; the rest go on 'data'.")
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed steps, each followed by one call of every candidate peak '
                                'matmul.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps (and matmul calls) before the timed ones.')
_MATMUL_SIZE = flags.DEFINE_integer('matmul_size', None, 'n of the square n x n x n candidate peak matmul '
                                    '(default: 8192 on GPU/TPU, 4096 on CPU).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random parameters and tokens.')
_OUT = flags.DEFINE_string('out', None, 'JSON results path (default: runs/benchmarks/train_step_<time>.json).')


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """FLOPs per token of one training step (see the module docstring for the formulas)."""

  matmul_params: int  # N: block kernels + output head
  block_matmul_params: int  # the part of N inside the blocks (what remat recomputes)
  attention_width: int  # sum over layers of H * Q
  seq_len: int
  summary_forward: int  # model.summary(params, seq_len=T).total.flops

  @property
  def model(self) -> int:
    return 6 * self.matmul_params + 12 * self.attention_width * self.seq_len

  @property
  def cross_check(self) -> int:
    return 3 * self.summary_forward

  @property
  def expected_gap(self) -> int:
    """PaLM's full T x T attention minus the causal count of `flops_per_token`."""
    return 6 * self.attention_width * (self.seq_len - 1)

  def hardware(self, remat: bool) -> int:
    recompute = 2 * self.block_matmul_params + 4 * self.attention_width * self.seq_len
    return self.model + (recompute if remat else 0)


def count_flops(model: models.Model, params: Any, seq_len: int) -> FlopCount:
  flat = core.flatten(params)
  kernels = {p: int(np.prod(core.shape_of(flat[p]))) for p in model.linear_paths(params)}
  n = sum(kernels.values())
  blocks = sum(v for p, v in kernels.items() if p.startswith(f'{model.block_path}/'))
  # A head tied to the embedding carries no kernel; flops_per_token lists its 2 * d * vocab FLOPs.
  n += sum(v for k, v in model.flops_per_token(params, seq_len).items() if k.startswith('head')) // 2
  width = sum(core.shape_of(flat[f'{model.block_path}/{i}/attn/q_proj/kernel'])[1]
              for i in range(model.num_layers(params)))
  forward = int(model.summary(params, seq_len=seq_len, by='total').total.flops)
  return FlopCount(matmul_params=n, block_matmul_params=blocks, attention_width=width, seq_len=seq_len,
                   summary_forward=forward)


def matmul_shapes(model: models.Model, params: Any, rows: int, square: int) -> dict[str, tuple[int, int, int]]:
  """(m, k, n) of the candidate peak matmuls: a large square one, and the step's largest block matmul and its
  head matmul at the step's per-device rows (batch x seq_len / devices / accum_steps)."""
  flat = core.flatten(params)
  kernels = {p: tuple(core.shape_of(flat[p])) for p in model.linear_paths(params)}
  block = max((s for p, s in kernels.items() if p.startswith(f'{model.block_path}/')), key=np.prod)
  return {'square': (square, square, square), 'block': (rows, *block),
          'head': (rows, model.config.hidden_size, model.config.vocab_size)}


class Matmul:
  """A compiled dense [m, k] @ [k, n] matmul on the default device, with its operands."""

  def __init__(self, shape: tuple[int, int, int], dtype: jnp.dtype):
    m, k, n = shape
    ka, kb = jax.random.split(jax.random.key(1))
    self.shape, self.dtype, self.flops = shape, jnp.dtype(dtype), 2 * m * k * n
    self.a = jax.random.normal(ka, (m, k), jnp.float32).astype(dtype)
    self.b = jax.random.normal(kb, (k, n), jnp.float32).astype(dtype)
    self.fn = jax.jit(jnp.matmul).lower(self.a, self.b).compile()

  def __call__(self) -> jax.Array:
    return self.fn(self.a, self.b)

  def result(self, times: list[float]) -> dict[str, Any]:
    timing = Timing(tuple(times))
    return {'shape': list(self.shape), 'dtype': self.dtype.name, **timing.as_dict(),
            'flop_per_s': self.flops / timing.median,
            'flop_per_s_range': [self.flops / max(times), self.flops / min(times)]}


def memory_available(device: Any) -> int | None:
  """Bytes the step may use on `device`: the allocator's limit on an accelerator, MemAvailable on CPU."""
  if device.platform == 'cpu':
    try:
      for line in pathlib.Path('/proc/meminfo').read_text().splitlines():
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
    except OSError:
      return None
    return None
  stats = device.memory_stats() or {}
  return stats.get('bytes_limit')


def resolve_flags() -> dict[str, Any]:
  """Flag values with per-model and per-backend defaults filled in."""
  preset = PRESETS[_MODEL.value][1]
  accelerator = jax.default_backend() in ('gpu', 'tpu')
  return {
      'model': _MODEL.value,
      'batch': _BATCH.value or preset['batch'],
      'seq_len': _SEQ_LEN.value or preset['seq_len'],
      'remat': preset['remat'] if _REMAT.value is None else _REMAT.value,
      'scan_layers': preset['scan_layers'] if _SCAN.value is None else _SCAN.value,
      'compute_dtype': _COMPUTE_DTYPE.value or ('bfloat16' if accelerator else 'float32'),
      'accum_steps': _ACCUM.value, 'fsdp': _FSDP.value,
      'optimizer': _OPTIMIZER.value or preset['optimizer' if accelerator else 'cpu_optimizer'],
      'repeats': _REPEATS.value, 'warmup': _WARMUP.value,
      'matmul_size': _MATMUL_SIZE.value or (8192 if accelerator else 4096), 'seed': _SEED.value,
  }


def rate(x: float) -> str:
  return f'{x:,.0f}' if x >= 100 else f'{x:.2f}'


def print_table(r: dict[str, Any]) -> None:
  s, p = r['step'], r['peak_matmul']
  rows = [
      ('step s', f'{s["median_s"]:.3f}', f'{s["min_s"]:.3f} - {s["max_s"]:.3f}'),
      ('tokens / s', rate(r['tokens_per_s']),
       f'{rate(r["tokens_per_s_range"][0])} - {rate(r["tokens_per_s_range"][1])}'),
      ('model TFLOP / s', f'{r["model_flop_per_s"] / 1e12:.3f}', ''),
      ('peak matmul TFLOP / s', f'{p["flop_per_s"] / 1e12:.3f}',
       (f'{p["flop_per_s_range"][0] / 1e12:.3f} - {p["flop_per_s_range"][1] / 1e12:.3f}  '
        f'({p["best"]} {"x".join(map(str, p["shape"]))} {p["dtype"]})')),
      ('MFU', f'{r["mfu"]:.3f}', f'{r["mfu_range"][0]:.3f} - {r["mfu_range"][1]:.3f}  of the measured matmul rate'),
      ('HFU', f'{r["hfu"]:.3f}', '(remat recompute counted)' if r['flags']['remat'] else ''),
      ('compile s', f'{r["compile_s"]:.1f}', f'(lowering {r["lower_s"]:.1f} s)'),
      ('step memory GiB / device', f'{r["memory"]["total"] / 2 ** 30:.2f}', '(compiled: args + out + temp - alias)'),
  ]
  f = r['flags']
  print(f'\n{r["model"]}: {r["num_params"]:,} parameters, batch {f["batch"]} x {f["seq_len"]}, '
        f'{f["compute_dtype"]}, remat={f["remat"]}, accum_steps={f["accum_steps"]}, {f["optimizer"]}, '
        f'{r["device_count"]} x {r["device_kind"]} ({r["backend"]}), {len(s["times_s"])} repeats')
  width = max(len(row[0]) for row in rows)
  print(f'{"":{width}}  {"median":>10}  spread (min - max)')
  for name, median, spread in rows:
    print(f'{name:{width}}  {median:>10}  {spread}'.rstrip())


def main(argv: list[str]) -> None:
  del argv
  cfg = resolve_flags()
  load_before = os.getloadavg()  # other work on a shared host shows up as spread
  devices = jax.devices()
  print(f'jax {jax.__version__}, {len(devices)} x {devices[0].device_kind} ({jax.default_backend()})')
  model = PRESETS[cfg['model']][0]()
  batch, seq_len, dtype = cfg['batch'], cfg['seq_len'], jnp.dtype(cfg['compute_dtype'])
  max_len = model.max_positions()
  if max_len is not None and seq_len > max_len:
    raise app.UsageError(f'--seq_len={seq_len} exceeds the {max_len} positions of {cfg["model"]}.')

  tx = optim.make_optimizer(optim.OptimizerConfig(name=cfg['optimizer']))
  init_key, state_key = jax.random.split(jax.random.key(cfg['seed']))
  make_state = lambda: state_lib.init_state(jax.jit(model.init)(init_key), tx, state_key)
  abstract = jax.eval_shape(make_state)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  print(f'model {cfg["model"]}: {num_params:,} parameters ({num_params / 1e9:.3f}B), {model.config}')

  mesh = sharding.make_mesh(data=-1, fsdp=cfg['fsdp'])
  divisor = sharding.batch_divisor(mesh) * cfg['accum_steps']
  if batch % divisor:
    raise app.UsageError(f'--batch={batch} must be a multiple of data x fsdp devices x accum_steps = {divisor}.')
  shardings = sharding.state_shardings(abstract, mesh, model.sharding_rules())
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = step_lib.compile_step(
      step_lib.make_train_step(objectives.causal_lm(model, remat=cfg['remat'], scan=cfg['scan_layers']), tx,
                               compute_dtype=dtype, accum_steps=cfg['accum_steps'],
                               activation_sharding=batch_sharding),
      state_sharding=shardings, batch_sharding=batch_sharding)
  tokens_shape = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  print(f'compiling the step: batch {batch} x {seq_len}, {dtype.name}, remat={cfg["remat"]}, '
        f'scan_layers={cfg["scan_layers"]}, mesh '
        f'{dict(mesh.shape)} ...', flush=True)
  lowered, lower_s = timed(step_fn.lower, abstract, {'inputs': tokens_shape, 'targets': tokens_shape})
  compiled, compile_s = timed(lowered.compile)
  memory = memory_need(compiled)
  available = memory_available(devices[0])
  print(f'  lowering {lower_s:.1f} s, compile {compile_s:.1f} s; step needs {memory["total"] / 2 ** 30:.2f} GiB '
        f'per device (args {memory["argument"] / 2 ** 30:.2f}, temp {memory["temp"] / 2 ** 30:.2f}, out '
        f'{memory["output"] / 2 ** 30:.2f}, aliased {memory["alias"] / 2 ** 30:.2f})'
        + (f'; {available / 2 ** 30:.1f} GiB available' if available else ''), flush=True)
  if available and memory['total'] > available:
    sys.exit(f'The step needs {memory["total"] / 2 ** 30:.1f} GiB per device but {available / 2 ** 30:.1f} GiB '
             'are available: lower --batch or --seq_len, add --remat, raise --accum_steps, or use --fsdp over '
             'more devices.')

  state, init_s = timed(jax.jit(make_state, out_shardings=shardings))
  rng = np.random.RandomState(cfg['seed'])
  tokens = rng.randint(0, model.config.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  device_batch = sharding.global_batch({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}, mesh)
  flops = count_flops(model, state.params, seq_len)
  print(f'  state initialised in {init_s:.1f} s; model FLOPs/token {flops.model / 1e9:.3f} G (PaLM), '
        f'3 x forward from model.summary {flops.cross_check / 1e9:.3f} G; difference '
        f'{(flops.model - flops.cross_check) / 1e6:.2f} M, causal attention half 6*L*H*Q*(T-1) = '
        f'{flops.expected_gap / 1e6:.2f} M', flush=True)

  rows = batch * seq_len // (sharding.batch_divisor(mesh) * cfg['accum_steps'])
  shapes = matmul_shapes(model, abstract.params, rows, cfg['matmul_size'])
  matmuls = {name: Matmul(shape, dtype) for name, shape in shapes.items()}
  print(f'timing: {cfg["warmup"]} + {cfg["repeats"]} steps, each followed by the candidate peak {dtype.name} '
        f'matmuls (m, k, n) {shapes}, so both see the same load ...', flush=True)
  losses, times = [], []
  matmul_times: dict[str, list[float]] = {name: [] for name in matmuls}
  for i in range(cfg['warmup'] + cfg['repeats']):
    (state, metrics), seconds = timed(compiled, state, device_batch)
    losses.append(float(metrics['loss']))
    mm = {name: timed(fn)[1] for name, fn in matmuls.items()}
    if i >= cfg['warmup']:
      times.append(seconds)
      for name, t in mm.items():
        matmul_times[name].append(t)
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f'non-finite training loss in the benchmark: {losses}')
  del state
  step = Timing(tuple(times))
  candidates = {name: fn.result(matmul_times[name]) for name, fn in matmuls.items()}
  best = max(candidates, key=lambda name: candidates[name]['flop_per_s'])
  peak = {'best': best, **candidates[best], 'candidates': candidates}
  print(f'  step {step.median:.3f} s (median of {len(times)}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; '
        + ', '.join(f'{n} matmul {c["flop_per_s"] / 1e12:.3f} TFLOP/s' for n, c in candidates.items()), flush=True)
  peak_total = peak['flop_per_s'] * len(devices)  # timed on one device; the step runs on all of them
  tokens_per_step = batch * seq_len
  model_rate = flops.model * tokens_per_step / step.median
  rate_range = [flops.model * tokens_per_step / t for t in (max(times), min(times))]
  now = datetime.datetime.now(datetime.UTC)
  result = {
      'benchmark': 'train_step', 'model': cfg['model'], 'config': model.config, 'num_params': num_params,
      'flags': cfg, 'mesh': dict(mesh.shape), 'backend': jax.default_backend(), 'device_kind': devices[0].device_kind,
      'device_count': len(devices), 'lower_s': lower_s, 'compile_s': compile_s, 'init_s': init_s,
      'memory': memory, 'memory_available': available,
      'flops_per_token': {'model': flops.model, 'hardware': flops.hardware(cfg['remat']),
                          'cross_check_3x_summary_forward': flops.cross_check, 'expected_gap': flops.expected_gap,
                          **dataclasses.asdict(flops)},
      'step': step.as_dict(), 'losses': losses, 'tokens_per_step': tokens_per_step,
      'tokens_per_s': tokens_per_step / step.median,
      'tokens_per_s_range': [tokens_per_step / max(times), tokens_per_step / min(times)],
      'model_flop_per_s': model_rate, 'peak_matmul': peak, 'peak_flop_per_s': peak_total,
      'mfu': model_rate / peak_total, 'mfu_range': [r / peak_total for r in rate_range],
      'hfu': flops.hardware(cfg['remat']) * tokens_per_step / step.median / peak_total,
      'load_avg_1m': {'before': load_before[0], 'after': os.getloadavg()[0]},
      'environment': provenance.environment(),
  }
  print_table(result)
  out = pathlib.Path(_OUT.value) if _OUT.value else (
      REPO / 'runs' / 'benchmarks' / f'train_step_{cfg["model"]}_{now.strftime("%Y%m%d_%H%M%S")}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  provenance.write_json(out, result)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  app.run(main)
