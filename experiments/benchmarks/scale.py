"""Compression at scale on one small host: a ~3B-parameter Llama, never whole in memory, SparseGPT then GPTQ.

    python experiments/benchmarks/scale.py --layers=2                  # write the 3B checkpoint, compress 2 blocks
    python experiments/benchmarks/scale.py --layers=2 --kill_trials=5 --parallel
    python experiments/benchmarks/scale.py --small                     # a tiny model, compression only: the test

Phases (each in a fresh interpreter, so its peak RSS (VmHWM) is its own):
  1. write: a random Llama (default hidden 3072, 28 layers, intermediate 8192, 24 heads / 8 KV heads, vocab
     32000: 3.01 B parameters, 6.0 GB in bf16) as an HF checkpoint, one safetensors shard per block, each
     tensor generated from its own PRNG key and written before the next is made (skipped when present).
  2. compress: `calibration.compress_checkpoint` with a per-kernel SparseGPT 50% then GPTQ W4 g128 of the
     pruned weights under the same mask (`core.Masked(core.Quantized)`), true-sequential per input group, the
     kernels of each group solved with `calibration.solve_parallel` from one in-place host factor of their
     shared XᵀX (`inverse_hessian.inverse_factor_inplace`, `sparsegpt_from_factor`, `gptq_from_factor`).
     Prints seconds per block (solve and total), the peak RSS (VmHWM) against the checkpoint's bytes (goal: at
     most 25%), and the full-model time extrapolated from the blocks run (labelled as such). With --small (or
     --check_in_memory) the reloaded output is compared with `run_sequential` in memory, bit for bit (the small
     model is float32 so both paths carry float32 hidden states).
  3. --kill_trials: on a 6-block model, a compression SIGKILLed at a random moment inside a block picked at
     random (timed from an uninterrupted run's block end times), then rerun, gives the same output file hashes
     as the uninterrupted run (each trial).
  4. --parallel: one block of a mid-size model compressed with its solves on 1 device, on 8 virtual devices
     (XLA_FLAGS host device count) and split between 2 processes (gloo, 1 device each; calibration in each
     process on every row): solve-phase seconds of each, their ratios, and whether the outputs are identical.
     Then the 2 processes with the calibration rows split between them too (statistics all-reduced): whether
     the output is identical, and else what fraction of mask entries and weights differ. Then 1 process and the
     2 processes with split rows again, both calibrating with deterministic=True (each row alone, statistics
     merged in an order fixed by the batch size): whether those two outputs are identical.
     On a CPU host the 8 "devices" and the 2 processes share its cores.
Results: --out/results.json and a printed table.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]

from absl import app, flags  # noqa: E402

flags.DEFINE_string('dir', '/tmp/jaxcompress_scale', 'work directory: checkpoints and compressed outputs')
flags.DEFINE_string('out', '', 'results directory (default: --dir/results)')
flags.DEFINE_integer('hidden', 3072, 'hidden size')
flags.DEFINE_integer('num_layers', 28, 'blocks of the model')
flags.DEFINE_integer('intermediate', 8192, 'MLP width')
flags.DEFINE_integer('heads', 24, 'attention heads')
flags.DEFINE_integer('kv_heads', 8, 'key/value heads')
flags.DEFINE_integer('vocab', 32000, 'vocabulary')
flags.DEFINE_integer('layers', 0, 'compress only the first N blocks (0: all); a rerun without it goes on')
flags.DEFINE_integer('batches', 4, 'calibration batches')
flags.DEFINE_integer('batch', 2, 'rows per calibration batch')
flags.DEFINE_integer('seq_len', 256, 'tokens per row')
flags.DEFINE_integer('group_size', 128, 'GPTQ rows per scale')
flags.DEFINE_integer('seed', 0, 'seed of the random weights and the calibration tokens')
flags.DEFINE_string('dtype', 'bfloat16', "checkpoint dtype: 'bfloat16' or 'float32'")
flags.DEFINE_bool('check_in_memory', False, 'also compress in memory (run_sequential) and compare the outputs')
flags.DEFINE_integer('kill_trials', 0, 'SIGKILL-and-rerun trials on a small model')
flags.DEFINE_bool('parallel', False, 'time one block\'s solves on 8 virtual devices vs 1')
flags.DEFINE_bool('main', True, 'write and compress the main model (--nomain: only the kill / parallel phases)')
flags.DEFINE_bool('small', False, 'a tiny model and every phase: the smoke test')
flags.DEFINE_string('phase', '', 'internal: run one phase in this process (write | compress)')
flags.DEFINE_bool('mesh', False, 'internal: solve over a mesh of every device')
flags.DEFINE_bool('data_parallel', False, 'internal: with --mesh, also split the calibration rows over the mesh '
                  '(each process passes its own rows; statistics all-reduced)')
flags.DEFINE_bool('deterministic', False, 'internal: calibrate with deterministic=True (statistics the same to the '
                  'bit however the rows are split)')
flags.DEFINE_float('kill_after', 0.0, 'internal: SIGKILL this process after this many seconds')
flags.DEFINE_string('coordinator', '', 'internal: host:port of a multi-process (gloo) compression')
flags.DEFINE_integer('num_processes', 1, 'internal: processes of a multi-process compression')
flags.DEFINE_integer('process_id', 0, 'internal: this process')
FLAGS = flags.FLAGS

# the smoke model is float32, so that the in-memory path (hidden states in the parameters' dtype) is comparable
# bit for bit with the out-of-core one (hidden states kept in float32); its MLP is as wide as the model, so every
# kernel but k and v has one shape and the solvers compile twice, not four times
SMALL = dict(hidden=128, num_layers=3, intermediate=128, heads=4, kv_heads=2, vocab=512, batches=2, batch=2,
             seq_len=32, group_size=32, dtype='float32')
# blocks of a few seconds each, so that a kill timed to land inside a block lands there
KILL_MODEL = dict(hidden=1024, num_layers=6, intermediate=2816, heads=8, kv_heads=8, vocab=1024, batches=2, batch=2,
                  seq_len=32, group_size=32, dtype='bfloat16')
PARALLEL_MODEL = dict(hidden=1024, num_layers=2, intermediate=2816, heads=8, kv_heads=8, vocab=1024, batches=2,
                      batch=2, seq_len=128, group_size=128, dtype='bfloat16')
SHAPE_FLAGS = ('hidden', 'num_layers', 'intermediate', 'heads', 'kv_heads', 'vocab', 'batches', 'batch', 'seq_len',
               'group_size', 'dtype')


def param_count(c: dict) -> int:
  d, f, v = c['hidden'], c['intermediate'], c['vocab']
  kv = d // c['heads'] * c['kv_heads']
  block = d * (2 * d + 2 * kv) + 3 * d * f + 2 * d
  return c['num_layers'] * block + 2 * v * d + d  # untied head


def spec(c: dict):
  from jaxcompress import models
  return models.Llama(models.LlamaConfig(vocab_size=c['vocab'], hidden_size=c['hidden'],
                                         intermediate_size=c['intermediate'], num_layers=c['num_layers'],
                                         num_heads=c['heads'], num_kv_heads=c['kv_heads'],
                                         max_position_embeddings=max(2048, c['seq_len'])))


# Phase 1: the checkpoint, tensor by tensor ------------------------------------------------------------------------


def write_checkpoint(path: pathlib.Path, c: dict, seed: int) -> int:
  """A random HF Llama checkpoint (bf16, or float32 with c['dtype']); returns its tensor bytes. Never more
  than one tensor in memory."""
  import jax
  import ml_dtypes
  import numpy as np
  dtype, tag = (np.dtype(np.float32), 'F32') if c.get('dtype') == 'float32' else (np.dtype(ml_dtypes.bfloat16),
                                                                                'BF16')
  model = spec(c)
  if (path / 'model.safetensors.index.json').exists():
    return json.loads((path / 'model.safetensors.index.json').read_text())['metadata']['total_size']
  path.mkdir(parents=True, exist_ok=True)
  model.hf_config().save_pretrained(str(path))
  d, f, v = c['hidden'], c['intermediate'], c['vocab']
  kv = d // c['heads'] * c['kv_heads']
  shards = {'model-outer.safetensors': [('model.embed_tokens.weight', (v, d)), ('model.norm.weight', (d,)),
                                        ('lm_head.weight', (v, d))]}
  for i in range(c['num_layers']):
    p = f'model.layers.{i}.'
    shards[f'model-layer-{i:03d}.safetensors'] = [
        (p + 'input_layernorm.weight', (d,)), (p + 'post_attention_layernorm.weight', (d,)),
        (p + 'self_attn.q_proj.weight', (d, d)), (p + 'self_attn.k_proj.weight', (kv, d)),
        (p + 'self_attn.v_proj.weight', (kv, d)), (p + 'self_attn.o_proj.weight', (d, d)),
        (p + 'mlp.gate_proj.weight', (f, d)), (p + 'mlp.up_proj.weight', (f, d)), (p + 'mlp.down_proj.weight', (d, f))]
  key = jax.random.key(seed)
  weight_map, total, k = {}, 0, 0
  for fname, tensors in shards.items():
    header, offset = {}, 0
    for name, shape in tensors:
      n = int(np.prod(shape)) * dtype.itemsize
      header[name] = {'dtype': tag, 'shape': list(shape), 'data_offsets': [offset, offset + n]}
      offset += n
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    tmp = path / f'.{fname}.tmp'
    with open(tmp, 'wb') as out:
      out.write(len(text).to_bytes(8, 'little'))
      out.write(text)
      for name, shape in tensors:
        if name.endswith('norm.weight'):
          x = np.ones(shape, dtype)
        else:  # fan-in scaled, so hidden states keep their size through 28 random blocks
          scale = 1.0 / np.sqrt(shape[-1]) if 'embed' not in name else 1.0
          x = np.asarray(jax.random.normal(jax.random.fold_in(key, k), shape, jax.numpy.float32) * scale
                         ).astype(dtype)
        out.write(x.tobytes())
        weight_map[name] = fname
        total += x.nbytes
        k += 1
        del x
    os.replace(tmp, path / fname)
  (path / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {'total_size': total},
                                                                 'weight_map': weight_map}))
  return total


# Phase 2: compression --------------------------------------------------------------------------------------------


def recipe(c: dict) -> dict:
  return {'sparsegpt': {'sparsity': 0.5, 'block_size': 128, 'damp': 0.01},
          'gptq': {'bits': 4, 'group_size': c['group_size'], 'damp': 0.01},
          'factor': 'inverse_factor_inplace, one per distinct XᵀX'}


def make_compress_block(c: dict, mesh):
  """compress_block for `compress_checkpoint` / `run_sequential`: per kernel SparseGPT 50% then GPTQ W4 of the
  pruned weights, Masked(Quantized).

  Memory: the kernels of one group share their input, so their XᵀX are equal; each distinct one is copied to
  the host, its entries popped from `stats` (so the caller's copy goes too), factored in place (one [in, in]
  float32 matrix at a time: 256 MiB for an 8192-wide input, where the jitted factor takes about four) and that
  factor serves both solvers of every kernel of the group.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxcompress import calibration, core, pruning, quantization
  from jaxcompress.calibration import inverse_hessian

  def kernel(w, u, dead):
    f = inverse_hessian.Factor(u=u, dead=dead, perm=jnp.arange(u.shape[0], dtype=jnp.int32), damp=0.01)
    m = pruning.sparsegpt_from_factor(w, f, sparsity=0.5, block_size=128)
    q = quantization.gptq_from_factor(m.value, f, bits=4, group_size=c['group_size'])
    return core.Masked(value=q, mask=m.mask)

  # Models with an input wider than 4096 (the 3B config) drop compiled programs before and after each group's
  # solves: the block's calibration, solver and forward programs kept together are ~0.15 GiB of host memory,
  # recompiling them costs time, not peak memory. Smaller models (the kill and parallel phases) keep them.
  lean = max(c['hidden'], c['intermediate']) > 4096

  def compress_block(i, block, stats):
    del i
    if lean:
      jax.clear_caches()
    solved = {}
    while stats:
      first = next(iter(stats))
      h = stats[first]['xtx']
      same = [p for p in stats if p == first or np.array_equal(np.asarray(stats[p]['xtx']), np.asarray(h))]
      h = inverse_hessian.aligned_copy(h)  # a writable host copy (device_put shares it); the statistics go now
      for p in same:
        del stats[p]
      f = inverse_hessian.inverse_factor_inplace(h, damp=0.01, caller='scale')
      u, dead = jax.device_put(f.u), jnp.asarray(f.dead)
      del f, h
      problems = {p: (jnp.asarray(core.paths.get(block, p)), u, dead) for p in same}
      solved.update(calibration.solve_parallel(kernel, problems, mesh=mesh))
      del problems, u, dead
    if lean:
      jax.clear_caches()
    return core.paths.replace(block, solved)

  return compress_block


def calibration_batches(c: dict, seed: int):
  import numpy as np
  rs = np.random.RandomState(seed)
  return [{'tokens': rs.randint(0, c['vocab'], (c['batch'], c['seq_len'])).astype(np.int32)}
          for _ in range(c['batches'])]


def compress(src: pathlib.Path, out: pathlib.Path, c: dict, seed: int, layers: int, use_mesh: bool) -> dict:
  import jax
  from jaxcompress import calibration
  mesh = jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,)) if use_mesh \
      else None
  blocks = []

  def on_block(i, record):
    blocks.append({'block': i, **{k: record[k] for k in ('seconds', 'solve_seconds', 'bytes')}, 'rss': rss(),
                   'peak_rss': vm_hwm(), 'ends_at': time.perf_counter() - _PHASE_START[0]})
    print(f'block {i}: {record["seconds"]:.1f} s (solve {record["solve_seconds"]:.1f} s), '
          f'{record["bytes"] / 2**20:.1f} MiB, RSS {rss() / 2**30:.2f} GiB, peak so far {vm_hwm() / 2**30:.3f} GiB',
          flush=True)

  batches, data_mesh = calibration_batches(c, seed), None
  if FLAGS.data_parallel and mesh is not None:  # this process's contiguous share of every batch's rows
    n, p = jax.process_count(), jax.process_index()
    batches = [{'tokens': b['tokens'][p * len(b['tokens']) // n:(p + 1) * len(b['tokens']) // n]} for b in batches]
    data_mesh = mesh
  t0 = time.perf_counter()
  manifest = calibration.compress_checkpoint(src, out, make_compress_block(c, mesh), batches,
                                             observer=calibration.hessian(), recipe=recipe(c), seed=seed,
                                             per_group=True, layers=layers or None, on_block=on_block,
                                             mesh=data_mesh, deterministic=FLAGS.deterministic)
  result = {'blocks': blocks, 'seconds': time.perf_counter() - t0, 'complete': manifest['complete'],
            'peak_rss': vm_hwm(), 'hashes': {r['file']: r['sha256'] for r in manifest['blocks'].values()}}
  if FLAGS.check_in_memory and manifest['complete']:
    result['matches_in_memory'] = matches_in_memory(src, out, c, seed, mesh)
  return result


def matches_in_memory(src: pathlib.Path, out: pathlib.Path, c: dict, seed: int, mesh) -> bool:
  """Whether the reloaded output equals `run_sequential` on the whole model in memory, bit for bit."""
  import numpy as np
  from jaxcompress import calibration, core, models
  model, params = models.from_pretrained(src)
  ref, _ = calibration.run_sequential(model, params, calibration_batches(c, seed), calibration.hessian(),
                                      make_compress_block(c, mesh), per_group=True, keep_stats=False)
  got, ref = core.flatten(calibration.load_compressed(out)), core.flatten(ref)
  same = sorted(got) == sorted(ref)
  for path in ref if same else ():
    same = same and np.array_equal(np.asarray(core.materialize(got[path])), np.asarray(core.materialize(ref[path])))
  print(f'output reloaded equals the in-memory run_sequential: {same}', flush=True)
  return bool(same)


def rss() -> int:
  return _status('VmRSS:')


def vm_hwm() -> int:
  return _status('VmHWM:')


def _status(field: str) -> int:
  for line in open('/proc/self/status'):
    if line.startswith(field):
      return int(line.split()[1]) * 1024
  return 0


# Driver: each phase in a fresh interpreter ------------------------------------------------------------------------


def _xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child of `devices` CPU devices: this process's other XLA flags kept, its device count replaced."""
  flag = '--xla_force_host_platform_device_count'
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(flag + '=')]
  return ' '.join([*kept, f'{flag}={devices}'])


def child(phase: str, c: dict, *, work: pathlib.Path, devices: int = 1, layers: int = 0, mesh: bool = False,
          kill_after: float = 0.0, timeout: float | None = None, check: bool = False,
          deterministic: bool = False) -> dict | None:
  args = [sys.executable, __file__, f'--phase={phase}', f'--dir={work}', f'--seed={FLAGS.seed}',
          f'--layers={layers}', f'--mesh={mesh}', f'--kill_after={kill_after}', f'--deterministic={deterministic}']
  args += [f'--{k}={c[k]}' for k in SHAPE_FLAGS]
  env = dict(os.environ, XLA_FLAGS=_xla_flags(devices), JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  if check:
    args.append('--check_in_memory')
  # stdout streamed line by line (a 3B run prints a line per block for an hour), stderr kept for errors
  with tempfile.TemporaryFile('w+') as err:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    result = None
    try:
      for line in proc.stdout:
        if line.startswith('RESULT '):
          result = json.loads(line[len('RESULT '):])
        else:
          sys.stdout.write(line)
          sys.stdout.flush()
      code = proc.wait(timeout=timeout)
    except BaseException:
      proc.kill()
      raise
    if kill_after and code == -signal.SIGKILL:
      return None
    if code != 0 or result is None:
      err.seek(0)
      raise RuntimeError(f'phase {phase} failed (rc={code}):\n{err.read()[-4000:]}')
  return result


_PHASE_START = [0.0]  # perf_counter when run_phase began: kill delays and block end times share this origin


def run_phase() -> None:
  _PHASE_START[0] = time.perf_counter()
  c = {k: getattr(FLAGS, k) for k in SHAPE_FLAGS}
  work = pathlib.Path(FLAGS.dir)
  src = work / f'llama-{c["hidden"]}x{c["num_layers"]}'
  if FLAGS.kill_after:
    import threading
    threading.Timer(FLAGS.kill_after, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
  if FLAGS.phase == 'write':
    result = {'bytes': write_checkpoint(src, c, FLAGS.seed), 'params': param_count(c), 'path': str(src)}
  else:
    import jax
    if FLAGS.num_processes > 1:
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator, num_processes=FLAGS.num_processes,
                                 process_id=FLAGS.process_id)
    out = work / (f'out-{src.name}' + (f'-mesh{jax.device_count()}' if FLAGS.mesh else '')
                  + ('-dp' if FLAGS.data_parallel else '') + ('-det' if FLAGS.deterministic else ''))
    result = compress(src, out, c, FLAGS.seed, FLAGS.layers, FLAGS.mesh)
  print('RESULT ' + json.dumps(result), flush=True)
  os._exit(0)  # a pending kill timer must not outlive the phase


def main(argv) -> None:
  del argv
  if FLAGS.phase:
    run_phase()
    return
  work = pathlib.Path(FLAGS.dir)
  results_dir = pathlib.Path(FLAGS.out or work / 'results')
  results_dir.mkdir(parents=True, exist_ok=True)
  c = dict(SMALL) if FLAGS.small else {k: getattr(FLAGS, k) for k in SHAPE_FLAGS}
  results: dict = {'config': c, 'params': param_count(c), 'machine': 'shared 2-core CPU host'}
  n = param_count(c)
  need = n * 2 * 1.3
  free = os.statvfs(work.parent if not work.exists() else work)
  if free.f_bavail * free.f_frsize < need:
    raise SystemExit(f'{work}: {free.f_bavail * free.f_frsize / 1e9:.1f} GB free, the checkpoint and its output '
                     f'need about {need / 1e9:.1f} GB; pass --dir on a larger disk.')
  print(f'model: {n / 1e9:.3f} B parameters, {n * 2 / 1e9:.2f} GB in bf16', flush=True)
  blocks = []
  if FLAGS.main:
    wrote = child('write', c, work=work)
    results['checkpoint_bytes'] = wrote['bytes']
    run = child('compress', c, work=work, layers=FLAGS.layers, check=FLAGS.small or FLAGS.check_in_memory)
    results['compress'] = run
    blocks = run['blocks']
  if blocks:
    # block 0 includes compiling the solvers for every shape; later blocks reuse them
    steady = blocks[1:] or blocks
    per_block = sum(b['seconds'] for b in steady) / len(steady)
    outside = run['seconds'] - sum(b['seconds'] for b in blocks)  # start, embedding, rest file
    results['summary'] = {
        'blocks_run': len(blocks), 'steady_block_s': per_block,
        'steady_solve_s': sum(b['solve_seconds'] for b in steady) / len(steady),
        'peak_rss_bytes': run['peak_rss'], 'rss_over_checkpoint': run['peak_rss'] / wrote['bytes'],
        'extrapolated_full_s': blocks[0]['seconds'] + per_block * (c['num_layers'] - 1) + outside}
  save = lambda: (results_dir / 'results.json').write_text(json.dumps(results, indent=1))
  save()
  print_table(results)
  trials = 0 if FLAGS.small else FLAGS.kill_trials
  if trials:
    results['kill_trials'] = kill_trials(work, dict(KILL_MODEL), trials)
    save()
  if FLAGS.parallel:
    results['parallel'] = parallel(work, dict(PARALLEL_MODEL))
    save()
  print_table(results)


def kill_trials(work: pathlib.Path, c: dict, trials: int) -> list[dict]:
  """SIGKILL a compression after a random delay, rerun it, compare hashes with an uninterrupted run."""
  import shutil
  work = work / 'kill'
  child('write', c, work=work)
  ref = child('compress', c, work=work)
  out = work / f'out-llama-{c["hidden"]}x{c["num_layers"]}'
  shutil.move(out, work / 'reference')
  # when each block of the uninterrupted run was done, measured from the phase's start like the kill timer:
  # each trial picks a block at random and dies at a random moment while that block is being compressed
  ends = [b['ends_at'] for b in ref['blocks']]
  starts = [ends[0] - ref['blocks'][0]['seconds'], *ends[:-1]]
  rng = random.Random(FLAGS.seed)
  rows = []
  for t in range(trials):
    shutil.rmtree(out, ignore_errors=True)
    k = rng.randrange(len(ends))
    delay = rng.uniform(starts[k], ends[k])
    killed = child('compress', c, work=work, kill_after=delay) is None
    done = sorted(json.loads((out / 'manifest.json').read_text())['blocks']) if (out / 'manifest.json').exists() \
        else []
    again = child('compress', c, work=work)
    rows.append({'trial': t, 'kill_after_s': round(delay, 2), 'in_block': k, 'killed': killed,
                 'blocks_before_kill': len(done), 'identical': again['hashes'] == ref['hashes']})
    print(f'kill trial {t}: killed={killed} after {delay:.1f} s (aimed inside block {k}), {len(done)} blocks '
          f'done; rerun identical: {rows[-1]["identical"]}', flush=True)
  shutil.rmtree(work / 'reference', ignore_errors=True)
  return rows


def parallel(work: pathlib.Path, c: dict) -> dict:
  import shutil
  work = work / 'parallel'
  child('write', c, work=work)
  for old in work.glob('out-*'):  # timings need fresh runs, not finished outputs from before
    shutil.rmtree(old)
  one = child('compress', c, work=work, devices=1, mesh=True)
  eight = child('compress', c, work=work, devices=8, mesh=True)
  two = child_pair(c, work=work)
  # the same 2 processes with the calibration rows split between them too: the statistics are all-reduced sums,
  # so they may differ from one process's in the last bits; how much of the output that changes is measured
  two_dp = child_pair(c, work=work, data_parallel=True)
  # and both with deterministic=True: each row alone, statistics merged in an order fixed by the batch size
  one_det = child('compress', c, work=work, devices=1, mesh=True, deterministic=True)
  two_dp_det = child_pair(c, work=work, data_parallel=True, deterministic=True)
  # the last block: the first one also compiles every solver (per device with 8 devices)
  s1, s8, s2 = (r['blocks'][-1]['solve_seconds'] for r in (one, eight, two))
  name = f'out-llama-{c["hidden"]}x{c["num_layers"]}'
  return {'solve_s_1': s1, 'solve_s_8': s8, 'ratio_1_over_8': s1 / s8, 'identical': one['hashes'] == eight['hashes'],
          'solve_s_2proc': s2, 'ratio_1_over_2proc': s1 / s2, 'identical_2proc': one['hashes'] == two['hashes'],
          'identical_2proc_data_parallel': one['hashes'] == two_dp['hashes'],
          'identical_2proc_data_parallel_deterministic': one_det['hashes'] == two_dp_det['hashes'],
          'block_s_1_deterministic': one_det['blocks'][-1]['seconds'],
          'block_s_2proc_data_parallel_deterministic': two_dp_det['blocks'][-1]['seconds'],
          'deterministic_data_parallel_vs_1': compare_outputs(work / f'{name}-mesh1-det',
                                                              work / f'{name}-mesh2-dp-det'),
          'block_s_1': one['blocks'][-1]['seconds'], 'block_s_2proc_data_parallel': two_dp['blocks'][-1]['seconds'],
          'data_parallel_vs_1': compare_outputs(work / f'{name}-mesh1', work / f'{name}-mesh2-dp'),
          'logit_error': {k: logit_error(work / f'llama-{c["hidden"]}x{c["num_layers"]}', work / f'{name}-{k}', c)
                          for k in ('mesh1', 'mesh2-dp', 'mesh1-det', 'mesh2-dp-det')}}


def logit_error(src: pathlib.Path, out: pathlib.Path, c: dict) -> float:
  """‖logits(compressed) - logits(original)‖ / ‖logits(original)‖ on held-out random tokens (seed + 1)."""
  import numpy as np
  from jaxcompress import calibration, models
  model, params = models.from_pretrained(src)
  tokens = np.random.RandomState(FLAGS.seed + 1).randint(0, c['vocab'], (2, c['seq_len'])).astype(np.int32)
  ref = np.asarray(model.apply(params, tokens), np.float32)
  got = np.asarray(model.apply(calibration.load_compressed(out), tokens), np.float32)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def compare_outputs(a: pathlib.Path, b: pathlib.Path) -> dict:
  """How two compressed outputs differ: fraction of mask entries and of weight entries (materialized) that
  are not equal, and the largest relative difference of a weight matrix."""
  import numpy as np
  from jaxcompress import calibration, core
  fa, fb = (core.flatten(calibration.load_compressed(p)) for p in (a, b))
  masks = weights = mask_diff = weight_diff = 0
  worst = 0.0
  for path in sorted(fa):
    x, y = fa[path], fb[path]
    if isinstance(x, core.Masked):
      masks += np.size(x.mask)
      mask_diff += int(np.sum(np.asarray(x.mask) != np.asarray(y.mask)))
    wx, wy = (np.asarray(core.materialize(v), np.float32) for v in (x, y))
    weights += wx.size
    weight_diff += int(np.sum(wx != wy))
    worst = max(worst, float(np.linalg.norm(wx - wy) / max(np.linalg.norm(wx), 1e-30)))
  return {'mask_entries_differing': mask_diff / max(masks, 1), 'weights_differing': weight_diff / max(weights, 1),
          'max_relative_difference': worst}


def child_pair(c: dict, *, work: pathlib.Path, data_parallel: bool = False, deterministic: bool = False) -> dict:
  """The compress phase as 2 processes (gloo, one CPU device each): calibration in each process on every row
  (data_parallel: on its own half of the rows, statistics all-reduced; deterministic: with deterministic=True),
  the solves of each block split between the processes (`solve_parallel` over their 2-device mesh)."""
  import socket
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=_xla_flags(1), JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  logs = [tempfile.TemporaryFile('w+') for _ in range(2)]
  procs = [subprocess.Popen([sys.executable, __file__, '--phase=compress', f'--dir={work}', f'--seed={FLAGS.seed}',
                             '--mesh=True', f'--data_parallel={data_parallel}', f'--deterministic={deterministic}',
                             f'--coordinator=localhost:{port}',
                             '--num_processes=2',
                             f'--process_id={i}', *[f'--{k}={c[k]}' for k in SHAPE_FLAGS]],
                            env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True) for i in range(2)]
  codes = [p.wait() for p in procs]
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  if codes != [0, 0]:
    raise RuntimeError(f'2-process compression failed (rc={codes}):\n' + '\n'.join(t[-3000:] for t in texts))
  lines = texts[0].splitlines()
  sys.stdout.write(''.join(f'[2 processes] {l}\n' for l in lines if l.startswith('block ')))
  return json.loads([l for l in lines if l.startswith('RESULT ')][-1][len('RESULT '):])


def print_table(r: dict) -> None:
  if 'checkpoint_bytes' in r:
    print(f"\nmodel {r['params'] / 1e9:.3f} B params, checkpoint {r['checkpoint_bytes'] / 2**30:.2f} GiB "
          f"({r['machine']})")
  s = r.get('summary')
  if s:
    print('| block | seconds | solve seconds | RSS after (GiB) |\n|---|---:|---:|---:|')
    for b in r['compress']['blocks']:
      print(f"| {b['block']} | {b['seconds']:.1f} | {b['solve_seconds']:.1f} | {b['rss'] / 2**30:.2f} |")
    print(f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB = {100 * s['rss_over_checkpoint']:.1f}% of the "
          f"checkpoint (goal <= 25%); {s['blocks_run']} blocks run, {s['steady_block_s']:.1f} s/block after the "
          f"first; " + (f"whole model measured: {r['compress']['seconds'] / 3600:.2f} h"
                        if s['blocks_run'] == r['config']['num_layers'] else
                        f"EXTRAPOLATED full model ({r['config']['num_layers']} blocks): "
                        f"{s['extrapolated_full_s'] / 3600:.2f} h"))
  if 'matches_in_memory' in r.get('compress', {}):
    print(f"output reloaded equals the in-memory path (run_sequential, same compressor): "
          f"{r['compress']['matches_in_memory']}")
  for t in r.get('kill_trials', []):
    print(f"kill trial {t['trial']}: killed={t['killed']} inside block {t.get('in_block')}, blocks done before the "
          f"kill={t['blocks_before_kill']}, rerun identical={t['identical']}")
  p = r.get('parallel')
  if p:
    print(f"solve phase, one block (after the first): 1 device {p['solve_s_1']:.2f} s, 8 virtual devices "
          f"{p['solve_s_8']:.2f} s, ratio {p['ratio_1_over_8']:.2f}; outputs identical: {p['identical']}")
    if 'solve_s_2proc' in p:
      print(f"solve phase, one block: 1 process {p['solve_s_1']:.2f} s, 2 processes (gloo) {p['solve_s_2proc']:.2f} s, "
            f"ratio {p['ratio_1_over_2proc']:.2f}; outputs identical: {p['identical_2proc']}")
    if 'data_parallel_vs_1' in p:
      d = p['data_parallel_vs_1']
      print(f"2 processes with the calibration rows split too (statistics all-reduced): whole block "
            f"{p['block_s_2proc_data_parallel']:.2f} s vs 1 process {p['block_s_1']:.2f} s; outputs identical: "
            f"{p['identical_2proc_data_parallel']} ({100 * d['mask_entries_differing']:.4f}% of mask entries and "
            f"{100 * d['weights_differing']:.4f}% of weights differ, largest relative difference of a matrix "
            f"{d['max_relative_difference']:.2e})")
    if 'deterministic_data_parallel_vs_1' in p:
      d = p['deterministic_data_parallel_vs_1']
      print(f"deterministic=True, 2 processes with split calibration rows vs 1 process: whole block "
            f"{p['block_s_2proc_data_parallel_deterministic']:.2f} s vs {p['block_s_1_deterministic']:.2f} s; "
            f"outputs identical: {p['identical_2proc_data_parallel_deterministic']} "
            f"({100 * d['mask_entries_differing']:.4f}% of mask entries and {100 * d['weights_differing']:.4f}% of "
            f"weights differ)")
    e = p.get('logit_error', {})
    if e:
      print('relative logit error against the uncompressed model: '
            + ', '.join(f'{k} {v:.4f}' for k, v in e.items()) + ' (meshN: N processes/devices; dp: split '
            'calibration rows; det: deterministic=True)')


if __name__ == '__main__':
  app.run(main)
