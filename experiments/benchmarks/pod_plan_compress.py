"""A pod-scale compression plan without a pod: the per-block calibration and solve programs of a Llama-2-70B,
compiled for N simulated devices from abstract inputs, and the memory each needs per device.

    python experiments/benchmarks/pod_plan_compress.py                         # Llama-2-70B, 256 devices
    python experiments/benchmarks/pod_plan_compress.py --preset=tiny --devices=8   # seconds: the test's case

The sibling of `pod_plan.py` (the training step); the same device simulation (XLA_FLAGS host device count, set
before jax loads) and the same per-device memory from `compiled.memory_analysis()` (arguments + outputs +
temporaries - aliased), compared with one --hbm_gib chip (16 GiB: a TPU v5e).

Programs, as `calibration.compress_checkpoint` runs them on a ('data',) mesh of every device:
  calibrate: one block on one batch (`calibration.driver._block_step` with the `hessian()` observer): the
    batch rows split over the devices, the block's bf16 weights and every kernel's XᵀX [in, in] float32
    replicated (all-reduced in the program), XᵀX donated. --per_group compiles only the largest group (down).
  sparsegpt, gptq (and both, in one program): `calibration.solve_parallel(traceable=True)`'s program: the
    block's same-shaped problems stacked and split over the devices (shard_map of a vmap), here the largest
    problem (down_proj: w [intermediate, hidden], H [intermediate, intermediate]), one per device. The traced
    solvers are the families' jitted cores (`pruning.sparsegpt._solve`, `quantization.gptq._solve`), since
    their public wrappers check their inputs on the host.
Nothing is allocated. What the CPU compiler reports is a plan, not a measurement of a TPU (see pod_plan.py).
"""

from __future__ import annotations

import os
import pathlib
import sys


COUNT_FLAG = '--xla_force_host_platform_device_count'


def simulate_devices(argv: list[str]) -> str:
  """XLA_FLAGS for --devices simulated CPU devices (default 256), set before jax loads (pod_plan.py's rule)."""
  import re
  count = 256
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--devices='):
      count = int(arg.split('=', 1)[1])
    elif arg == '--devices' and i + 1 < len(argv):
      count = int(argv[i + 1])
  flags_now = re.sub(rf'\s*{COUNT_FLAG}=\d+', '', os.environ.get('XLA_FLAGS', '')).strip()
  os.environ['XLA_FLAGS'] = f'{flags_now} {COUNT_FLAG}={count}'.strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return f'{count} simulated CPU devices'


DEVICES_NOTE = simulate_devices(sys.argv) if __name__ == '__main__' else ''

import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from experiments.benchmarks.benchlib import memory_need
from jaxcompress import calibration, models  # noqa: E402
from jaxcompress.calibration import driver  # noqa: E402

PRESETS = {
    # Llama-2-70B: 80 layers, 8192 wide, 64 heads (8 key/value), SwiGLU 28672, vocab 32000.
    'llama2_70b': models.LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_layers=80,
                                     num_heads=64, num_kv_heads=8, max_position_embeddings=4096),
    'tiny': models.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                               num_kv_heads=2, max_position_embeddings=256),
}

_PRESET = flags.DEFINE_enum('preset', 'llama2_70b', list(PRESETS), 'Model shapes.')
_DEVICES = flags.DEFINE_integer('devices', 256, 'Simulated CPU devices (read before jax loads).')
_BATCH = flags.DEFINE_integer('batch', 256, 'Calibration rows per batch (global), split over the devices.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 2048, 'Tokens per row.')
_PER_GROUP = flags.DEFINE_boolean('per_group', False, 'Calibrate the largest input group only (down_proj).')
_HBM_GIB = flags.DEFINE_float('hbm_gib', 16.0, 'Memory of one chip to compare with (16: TPU v5e).')
_OUT = flags.DEFINE_string('out', None, 'Also write the results here as JSON.')
_PROGRAMS = flags.DEFINE_list('programs', ['calibrate', 'sparsegpt', 'gptq'],
                               "Programs to compile: calibrate, sparsegpt, gptq, both (SparseGPT + GPTQ in one).")


def abstract(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def calibrate_program(model, mesh, per_group: bool):
  """The lowered per-block statistics step: (lowered, description)."""
  c = model.config
  rows_s, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  block = jax.tree.map(lambda s: abstract(s.shape, jnp.bfloat16, rep),
                       model.abstract_params()[model.block_path][0])
  observer = calibration.hessian()
  kernels = {'attn/q_proj/kernel': c.hidden_size, 'attn/k_proj/kernel': c.hidden_size,
             'attn/v_proj/kernel': c.hidden_size, 'attn/o_proj/kernel': c.hidden_size,
             'mlp/gate_proj/kernel': c.hidden_size, 'mlp/up_proj/kernel': c.hidden_size,
             'mlp/down_proj/kernel': c.intermediate_size}
  if per_group:
    kernels = {'mlp/down_proj/kernel': c.intermediate_size}
  stats = {p: jax.tree.map(lambda s: abstract(s.shape, s.dtype, rep), jax.eval_shape(lambda p=p, n=n: observer.init(p, n)))
           for p, n in kernels.items()}
  h = abstract((_BATCH.value, _SEQ_LEN.value, c.hidden_size), jnp.float32, rows_s)
  rows = driver.Rows(abstract((_BATCH.value, _SEQ_LEN.value), jnp.int32, rows_s))
  lowered = driver._block_step.lower(model, observer, block, h, rows, stats, shardings=(rows_s, rep), outputs=True)
  return lowered, f'{len(kernels)} XᵀX, batch {_BATCH.value} x {_SEQ_LEN.value} over {mesh.size} devices'


def solve_program(model, mesh, kind: str):
  """The lowered solve of the largest problem (down_proj), one stacked problem per device.

  kind: 'sparsegpt' or 'gptq' (each its own program, as `scale.py`'s per-kernel solver calls them one after
  the other), or 'both' in one program (their float32 temporaries then overlap in one buffer plan).
  """
  from jaxcompress.pruning._src import sparsegpt  # the modules, not the methods the packages export
  from jaxcompress.quantization._src import gptq
  from jaxcompress.calibration import inverse_hessian
  c = model.config
  n_in, n_out = c.intermediate_size, c.hidden_size
  group = min(128, n_in)

  def prune(w, h):  # the shared damped inverse-Hessian factor, then the solver's loop (as sparsegpt_layer)
    u, dead, _, _ = inverse_hessian._factor(h, jnp.float32(0.01), act_order=False)
    return sparsegpt._solve(w, u, dead, jnp.float32(0.5), nm=None, block_size=128)

  def quantize(w, h):
    u, dead, perm, _ = inverse_hessian._factor(h, jnp.float32(0.01), act_order=False)
    return gptq._solve(w, u, dead, perm, bits=4, group_size=group, act_order=False, symmetric=False,
                       block_size=128)

  solve = {'sparsegpt': prune, 'gptq': quantize, 'both': lambda w, h: (prune(w, h)[1], *quantize(prune(w, h)[0], h))
           }[kind]
  d = mesh.size
  split = NamedSharding(mesh, P('data'))
  w = abstract((d, n_in, n_out), jnp.float32, split)
  h = abstract((d, n_in, n_in), jnp.float32, split)
  program = calibration.parallel._compiled(solve, mesh, 'data', 2)
  what = {'sparsegpt': 'SparseGPT 50%', 'gptq': f'GPTQ W4 g{group}', 'both': f'SparseGPT 50% + GPTQ W4 g{group}'}
  return program.lower(w, h), f'{what[kind]} of w [{n_in}, {n_out}] (down_proj), one problem per device'


def main(argv) -> None:
  del argv
  print(DEVICES_NOTE)
  devices = jax.devices()
  model = models.Llama(PRESETS[_PRESET.value])
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  if _BATCH.value % len(devices):
    raise app.UsageError(f'--batch={_BATCH.value} must be a multiple of the {len(devices)} devices.')
  print(f'jax {jax.__version__}: {len(devices)} x {devices[0].device_kind}; {_PRESET.value}', flush=True)
  results = {'preset': _PRESET.value, 'devices': len(devices), 'devices_note': DEVICES_NOTE, 'programs': {}}
  for name, make in (('calibrate', functools.partial(calibrate_program, model, mesh, _PER_GROUP.value)),
                     ('sparsegpt', functools.partial(solve_program, model, mesh, 'sparsegpt')),
                     ('gptq', functools.partial(solve_program, model, mesh, 'gptq')),
                     ('both', functools.partial(solve_program, model, mesh, 'both'))):
    if name not in _PROGRAMS.value:
      continue
    t0 = time.perf_counter()
    lowered, what = make()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = memory_need(compiled)
    fits = m['total'] <= _HBM_GIB.value * 2 ** 30
    results['programs'][name] = {'what': what, 'lower_s': t1 - t0, 'compile_s': t2 - t1, 'memory': m, 'fits': fits}
    print(f'\n{name}: {what}\n  lowered {t1 - t0:.1f} s, compiled {t2 - t1:.1f} s; per device: '
          + ', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in m.items())
          + f'\n  fits a {_HBM_GIB.value:g} GiB chip: {"yes" if fits else "no"}', flush=True)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(results, indent=1, default=str))
  print('RESULT ' + json.dumps({k: {'total': v['memory']['total'], 'fits': v['fits']}
                                for k, v in results['programs'].items()}))


if __name__ == '__main__':
  app.run(main)
