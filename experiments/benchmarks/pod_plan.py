"""A pod-scale training plan without a pod: compile the real step for N simulated devices and read its needs.

    python experiments/benchmarks/pod_plan.py                                   # Llama-2-7B, 256 devices, fsdp=256
    python experiments/benchmarks/pod_plan.py --data 16 --fsdp 16               # same, 16-way data x 16-way fsdp
    python experiments/benchmarks/pod_plan.py --noconstrain_activations         # activations left to the partitioner
    python experiments/benchmarks/pod_plan.py --devices 16 --preset llama_1b --layers 4 --data 2 --fsdp 8 \
        --batch 16 --seq_len 128                                                # seconds: the test's case
    python experiments/benchmarks/pod_plan.py --devices 0 ...                   # the real devices (a TPU slice)

Nothing is allocated: parameters are `model.abstract_params()`, the TrainState is
`jax.eval_shape(state.init_state, ...)` over them, the batch is ShapeDtypeStructs. Shardings come from the
engine (`sharding.state_shardings`, `sharding.batch_sharding`) on a ('data', 'fsdp', 'tensor') mesh over
--devices CPU devices made by XLA_FLAGS=--xla_force_host_platform_device_count (set before jax is imported;
an explicit --devices replaces a count already in XLA_FLAGS, otherwise that count is used). The step is the
engine's (`step.make_train_step` with `objectives.causal_lm(model, remat=...)`, jitted by
`step.compile_step`, with the hidden states and logits pinned to the batch sharding as `loop.fit` does),
lowered and compiled as it would be for the pod.

Printed and written to --out as JSON:
  - lowering and compile time, and the compiling process's peak host memory;
  - per-device memory from `compiled.memory_analysis()`: arguments, outputs, temporaries, generated code,
    aliased (donated) bytes, and total = arguments + outputs + temporaries - aliased, compared with one chip
    of --hbm_gib (16 GiB: a TPU v5e) as "fits: yes/no"; beside it the state's own bytes per device, summed
    from the shardings;
  - the collectives of the compiled per-device program (all-gather, reduce-scatter, all-reduce, all-to-all,
    collective-permute): instruction counts and result bytes, counted once each in the program text (an op
    inside a loop body, e.g. of --accum_steps > 1, runs once per iteration).

What the CPU compiler says is a plan, not a measurement of the pod: it widens bfloat16 to float32 around dots
and collectives (weights are gathered in float32), reduces gradients with an all-reduce and a slice where a
TPU uses a reduce-scatter, and schedules collectives without a memory limit, so its temporaries can be far
above a TPU's. Compile with --devices 0 on the pod itself for its own numbers.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

DEFAULT_DEVICES = 256
COUNT_FLAG = '--xla_force_host_platform_device_count'


def requested_devices(argv: list[str]) -> int | None:
  """--devices from the command line, read before absl parses flags (jax must not be imported yet)."""
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--devices='):
      return int(arg.split('=', 1)[1])
    if arg == '--devices' and i + 1 < len(argv):
      return int(argv[i + 1])
  return None


def simulate_devices(requested: int | None) -> str:
  """Sets XLA_FLAGS (and JAX_PLATFORMS=cpu) for the simulated device count; returns what it did, in words."""
  xla_flags = os.environ.get('XLA_FLAGS', '')
  found = re.search(rf'{COUNT_FLAG}=(\d+)', xla_flags)
  if requested == 0:
    return 'real devices (--devices=0): XLA_FLAGS and JAX_PLATFORMS left as they are'
  if requested is None and found:
    count, note = int(found.group(1)), f'{found.group(1)} CPU devices from XLA_FLAGS already set'
  else:
    count = DEFAULT_DEVICES if requested is None else requested
    note = f'{count} simulated CPU devices'
    if found and int(found.group(1)) != count:
      note += f' (replacing {found.group(0)} in XLA_FLAGS)'
  xla_flags = re.sub(rf'\s*{COUNT_FLAG}=\d+', '', xla_flags).strip()
  os.environ['XLA_FLAGS'] = f'{xla_flags} {COUNT_FLAG}={count}'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return note


DEVICES_NOTE = simulate_devices(requested_devices(sys.argv)) if __name__ == '__main__' else ''

# jax, and everything that imports it, only after XLA_FLAGS is set.
import dataclasses
import datetime
import math
import resource
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxcompress import models, provenance

from experiments.benchmarks.benchlib import memory_need
from jaxcompress.train import objectives, optim, sharding
from jaxcompress.train import state as state_lib
from jaxcompress.train import step as step_lib

PRESETS: dict[str, models.LlamaConfig] = {
    # Llama-2-7B: 32 layers, 4096 wide, 32 heads (32 key/value), SwiGLU 11008, vocab 32000, untied head.
    'llama2_7b': models.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                                    num_heads=32, num_kv_heads=32, max_position_embeddings=4096),
    # TinyLlama-1.1B: 22 layers, 2048 wide, 32 heads (4 key/value), SwiGLU 5632, vocab 32000, untied head.
    'llama_1b': models.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                                   num_heads=32, num_kv_heads=4, max_position_embeddings=2048),
}
COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
               'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}

flags.DEFINE_integer('devices', DEFAULT_DEVICES, 'Simulated CPU devices (read before jax loads; 0: the real '
                     'devices, e.g. on a TPU slice).')
_PRESET = flags.DEFINE_enum('preset', 'llama2_7b', list(PRESETS), 'Model shapes.')
_LAYERS = flags.DEFINE_integer('layers', None, "Override the preset's number of layers (same width).")
_DATA = flags.DEFINE_integer('data', 1, "Mesh 'data' axis (batch only); -1 fills.")
_FSDP = flags.DEFINE_integer('fsdp', -1, "Mesh 'fsdp' axis (batch, parameters and optimizer state); -1 fills.")
_TENSOR = flags.DEFINE_integer('tensor', 1, "Mesh 'tensor' axis (matmul dimensions); -1 fills.")
_BATCH = flags.DEFINE_integer('batch', 256, 'Global sequences per step.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 2048, 'Tokens per sequence.')
_ACCUM = flags.DEFINE_integer('accum_steps', 1, 'Micro-batches per step (gradient accumulation).')
_COMPUTE_DTYPE = flags.DEFINE_enum('compute_dtype', 'bfloat16', ['float32', 'bfloat16'],
                                   'Forward/backward dtype over float32 master weights.')
_REMAT = flags.DEFINE_boolean('remat', True, 'Recompute each block in the backward pass.')
_SCAN = flags.DEFINE_boolean('scan_layers', True, 'Run the blocks as one lax.scan (Model.apply(scan=True)): one '
                             "block's gathered weights and gradients live at a time; --noscan_layers unrolls them.")
_CONSTRAIN = flags.DEFINE_boolean('constrain_activations', True, 'Pin hidden states and logits to the batch '
                                  'sharding (the engine default, as in loop.fit); --noconstrain_activations shows '
                                  'what the partitioner does without it.')
_OPTIMIZER = flags.DEFINE_enum('optimizer', 'adamw', list(optim.OPTIMIZERS), 'Optimizer (optim.make_optimizer).')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 16.0, 'Memory of one chip to compare with (16: TPU v5e).')
_HLO_OUT = flags.DEFINE_string('hlo_out', None, 'Also write the compiled per-device HLO text here.')
_OUT = flags.DEFINE_string('out', None, 'JSON results path (default: runs/benchmarks/pod_plan_<time>.json).')


def tree_bytes(tree: Any, per_device: bool = False) -> int:
  """Bytes of a tree of ShapeDtypeStructs; per_device: of one device's shard (needs .sharding)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


_COLLECTIVE_OP = re.compile(r'=\s*(\S.*?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')


def shape_bytes(hlo_type: str) -> list[int]:
  """Bytes of each array in an HLO type such as 'bf16[4096,128]{1,0}' or '(f32[8], u32[])'."""
  return [math.prod(int(d) for d in dims.split(',') if d) * DTYPE_BYTES.get(dtype, 4)
          for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', hlo_type)]


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{op: {'count', 'bytes'}} over the program's collective instructions: bytes of their results (all arrays
  of a tuple-shaped op; an async -start counts once, with its largest array, the gathered or reduced one)."""
  found = {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}
  for hlo_type, op, start in _COLLECTIVE_OP.findall(hlo_text):
    sizes = shape_bytes(hlo_type)
    found[op]['count'] += 1
    found[op]['bytes'] += max(sizes, default=0) if start else sum(sizes)
  return found


def gib(n: float) -> str:
  return f'{n / 2 ** 30:.2f} GiB'


def plan(model: models.Llama, mesh: jax.sharding.Mesh, result: dict[str, Any],
         save: Callable[[], None]) -> None:
  """Lowers and compiles the step for `mesh` from abstract values; fills `result` with the numbers the module
  docstring lists as it goes, and `save`s it before compiling ('stage' says how far a killed run got)."""
  tx = optim.make_optimizer(optim.OptimizerConfig(name=_OPTIMIZER.value))
  abstract_params = model.abstract_params()
  abstract_state = jax.eval_shape(lambda p: state_lib.init_state(p, tx, jax.random.key(0)), abstract_params)
  shardings = sharding.state_shardings(abstract_state, mesh, model.sharding_rules())
  sharded_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                               abstract_state, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  tokens = jax.ShapeDtypeStruct((_BATCH.value, _SEQ_LEN.value), jnp.int32, sharding=batch_sharding)
  objective = objectives.causal_lm(model, remat=_REMAT.value, scan=_SCAN.value)
  step_fn = step_lib.compile_step(
      step_lib.make_train_step(objective, tx,
                               compute_dtype=jnp.dtype(_COMPUTE_DTYPE.value), accum_steps=_ACCUM.value,
                               activation_sharding=batch_sharding if _CONSTRAIN.value else None),
      state_sharding=shardings, batch_sharding=batch_sharding)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))
  result.update(num_params=num_params, state_bytes=tree_bytes(abstract_state),
                state_bytes_per_device=tree_bytes(sharded_state, per_device=True), stage='lower')
  print(f'{num_params:,} parameters; state {gib(result["state_bytes"])} unsharded, '
        f'{gib(result["state_bytes_per_device"])} per device on mesh {dict(mesh.shape)}', flush=True)

  start = time.perf_counter()
  lowered = step_fn.lower(sharded_state, {'inputs': tokens, 'targets': tokens})
  result['lower_s'] = time.perf_counter() - start
  print(f'lowered in {result["lower_s"]:.1f} s; compiling ...', flush=True)
  result['stage'] = 'compile'
  save()
  start = time.perf_counter()
  compiled = lowered.compile()
  result['compile_s'] = time.perf_counter() - start
  result['stage'] = 'done'
  print(f'compiled in {result["compile_s"]:.1f} s', flush=True)

  result['memory'] = memory_need(compiled)
  result['fits'] = result['memory']['total'] <= _HBM_GIB.value * 2 ** 30
  text = compiled.as_text()
  result['collectives'] = collectives(text)
  result['hlo_chars'] = len(text)
  if _HLO_OUT.value:
    pathlib.Path(_HLO_OUT.value).write_text(text)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and 'flops' in cost:
    result['flops_per_device'] = float(cost['flops'])


def print_report(r: dict[str, Any]) -> None:
  m = r['memory']
  print(f'\n{r["preset"]} ({r["num_params"]:,} parameters, {r["config"]["num_layers"]} layers) on '
        f'{r["device_count"]} {r["device_kind"]} devices, mesh {r["mesh"]}; batch {r["flags"]["batch"]} x '
        f'{r["flags"]["seq_len"]}, {r["flags"]["compute_dtype"]}, remat={r["flags"]["remat"]}, '
        f'scan_layers={r["flags"]["scan_layers"]}, constrain_activations={r["flags"]["constrain_activations"]}, '
        f'{r["flags"]["optimizer"]}')
  print(f'lowering {r["lower_s"]:.1f} s, compile {r["compile_s"]:.1f} s, peak host memory '
        f'{gib(r["host_peak_rss_bytes"])}')
  print('per device:')
  for name in ('argument', 'output', 'temp', 'generated_code', 'alias'):
    print(f'  {name:<15} {gib(m[name]):>12}')
  print(f'  {"total":<15} {gib(m["total"]):>12}   (argument + output + temp - alias)')
  print(f'  {"state":<15} {gib(r["state_bytes_per_device"]):>12}   (params + optimizer state, from the shardings)')
  print(f'fits a {r["flags"]["hbm_gib"]:g} GiB chip: {"yes" if r["fits"] else "no"}')
  print('collectives (instructions in the program, result bytes):')
  for op, c in r['collectives'].items():
    print(f'  {op:<20} {c["count"]:>5}   {c["bytes"] / 2 ** 20:>10.1f} MiB')


def main(argv: list[str]) -> None:
  del argv
  print(DEVICES_NOTE)
  devices = jax.devices()
  expected = flags.FLAGS.devices
  if expected and flags.FLAGS['devices'].present and len(devices) != expected:
    raise RuntimeError(f'--devices={expected} but jax sees {len(devices)} devices; XLA_FLAGS was '
                       f'{os.environ.get("XLA_FLAGS")!r} (was jax imported before it was set?).')
  config = PRESETS[_PRESET.value]
  if _LAYERS.value:
    config = dataclasses.replace(config, num_layers=_LAYERS.value)
  model = models.Llama(config)
  mesh = sharding.make_mesh(_DATA.value, _FSDP.value, _TENSOR.value, devices=devices)
  divisor = sharding.batch_divisor(mesh) * _ACCUM.value
  if _BATCH.value % divisor:
    raise app.UsageError(f'--batch={_BATCH.value} must be a multiple of data x fsdp x accum_steps = {divisor}.')
  print(f'jax {jax.__version__}: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}); '
        f'{_PRESET.value}, mesh {dict(mesh.shape)}', flush=True)

  now = datetime.datetime.now(datetime.UTC)
  out = pathlib.Path(_OUT.value) if _OUT.value else (
      REPO / 'runs' / 'benchmarks' / f'pod_plan_{_PRESET.value}_{now.strftime("%Y%m%d_%H%M%S")}.json')
  out.parent.mkdir(parents=True, exist_ok=True)
  names = ('devices', 'preset', 'layers', 'data', 'fsdp', 'tensor', 'batch', 'seq_len', 'accum_steps',
           'compute_dtype', 'remat', 'scan_layers', 'constrain_activations', 'optimizer', 'hbm_gib')
  record = {'benchmark': 'pod_plan', 'preset': _PRESET.value, 'config': config,
            'flags': {n: flags.FLAGS[n].value for n in names}, 'mesh': dict(mesh.shape),
            'device_count': len(devices), 'device_kind': devices[0].device_kind, 'devices_note': DEVICES_NOTE,
            'environment': provenance.environment()}
  result: dict[str, Any] = {'stage': 'setup'}

  def save() -> None:
    record.update(result, host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    provenance.write_json(out, record)

  try:
    plan(model, mesh, result, save)
  except Exception as e:  # record where it failed, then fail
    result['error'] = f'{type(e).__name__}: {e}'
    save()
    print(f'failed; wrote {out}')
    raise
  save()
  print_report(provenance.to_jsonable(record))
  print(f'\nwrote {out}')


if __name__ == '__main__':
  app.run(main)
