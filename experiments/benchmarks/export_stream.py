"""A compressed model exported without ever being whole in memory: peak RSS of the streamed export against the
in-memory one.

    python experiments/benchmarks/export_stream.py            # scale.py's ~3B bf16 Llama, every block W4 g128
    python experiments/benchmarks/export_stream.py --small    # a tiny model: the smoke test

Phases, each in a fresh interpreter so that its peak RSS (VmHWM) is its own:
  1. write: scale.py's random Llama checkpoint (the model shape flags are scale.py's; skipped when present).
  2. compress: `calibration.compress_checkpoint` with round-to-nearest W4 (symmetric, groups of --group_size)
     per kernel, calibrated on column norms only (the cheapest statistics: the point here is the export).
  3. ct-stream: `models.compressed_tensors.export_parts` from `calibration.compressed_parts` (the rest, then each
     block), which is what `experiments/compress.py --out_of_core` writes.
  4. ct-memory: `calibration.load_compressed` and `models.compressed_tensors.export` of the whole tree.
  5. jxc-stream, jxc-memory: compressed.jxc the same two ways (`core.serialize.save_parts` of the parts, `save`
     of the whole tree).
Prints seconds and peak RSS of each export against the checkpoint's bytes (goal for the streamed ones: at most
25%, the bound of the out-of-core compression), and whether both ways give the same tensors (compressed-tensors:
each tensor's bytes hashed; jxc: the same file bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from absl import app, flags  # noqa: E402

from experiments.benchmarks import scale  # noqa: E402  (its model shape flags, checkpoint writer and VmHWM)

flags.DEFINE_string('export_phase', '', 'internal: run one phase in this process (compress or one of PHASES)')
FLAGS = flags.FLAGS
PHASES = ('ct-stream', 'ct-memory', 'jxc-stream', 'jxc-memory')


def _paths(c: dict) -> tuple[pathlib.Path, pathlib.Path]:
  work = pathlib.Path(FLAGS.dir)
  src = work / f'llama-{c["hidden"]}x{c["num_layers"]}'
  return src, work / f'rtn-{src.name}'


def compress(src: pathlib.Path, out: pathlib.Path, c: dict) -> dict:
  from jaxcompress import calibration, core

  def rtn(i, block, stats):
    del i
    return core.paths.replace(block, {p: core.quantize(core.paths.get(block, p), bits=4, group_size=c['group_size'],
                                                       symmetric=True) for p in stats})

  t0 = time.perf_counter()
  calibration.compress_checkpoint(src, out, rtn, scale.calibration_batches(c, FLAGS.seed),
                                  observer=calibration.column_norms(), recipe={'rtn': 4, 'g': c['group_size']},
                                  seed=FLAGS.seed, per_group=True)
  return {'seconds': time.perf_counter() - t0, 'peak_rss': scale.vm_hwm()}


def export(out: pathlib.Path, phase: str) -> dict:
  from jaxcompress import calibration, core
  from jaxcompress.models import compressed_tensors
  model = scale.spec({k: getattr(FLAGS, k) for k in scale.SHAPE_FLAGS})
  ct = phase.startswith('ct-')
  dest = out.parent / (f'{out.name}-{phase}' if ct else f'{out.name}-{phase}.jxc')
  t0 = time.perf_counter()
  if phase == 'ct-stream':
    compressed_tensors.export_parts(model, calibration.compressed_parts(out), dest)
  elif phase == 'ct-memory':
    compressed_tensors.export(model, calibration.load_compressed(out), dest)
  elif phase == 'jxc-stream':
    core.serialize.save_parts(dest, calibration.compressed_parts(out))
  else:
    core.serialize.save(dest, calibration.load_compressed(out))
  files = list(dest.glob('*.safetensors')) if ct else [dest]
  return {'seconds': time.perf_counter() - t0, 'peak_rss': scale.vm_hwm(), 'path': str(dest),
          'bytes': sum(f.stat().st_size for f in files)}


def tensor_digests(path: pathlib.Path) -> dict[str, str]:
  """{tensor name: sha256 of its dtype, shape and bytes} of a checkpoint directory, one tensor at a time."""
  from jaxcompress.models import tensor_reader
  out = {}
  for f in sorted(path.glob('*.safetensors')):
    reader = tensor_reader.TensorFile(f)
    for name in reader.names():
      a = reader.read(name)
      out[name] = hashlib.sha256(f'{a.dtype}{a.shape}'.encode() + a.tobytes()).hexdigest()
    reader.close()
  return out


def file_digest(path: pathlib.Path) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def child(phase: str, c: dict) -> dict:
  args = [sys.executable, __file__, f'--export_phase={phase}', f'--dir={FLAGS.dir}', f'--seed={FLAGS.seed}']
  args += [f'--{k}={c[k]}' for k in scale.SHAPE_FLAGS]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  proc = subprocess.run(args, env=env, capture_output=True, text=True)
  lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f'phase {phase} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def run_phase() -> None:
  c = {k: getattr(FLAGS, k) for k in scale.SHAPE_FLAGS}
  src, out = _paths(c)
  if FLAGS.export_phase == 'compress':
    result = compress(src, out, c)
  else:
    result = export(out, FLAGS.export_phase)
  print('RESULT ' + json.dumps(result), flush=True)


def main(argv) -> None:
  del argv
  if FLAGS.export_phase:
    run_phase()
    return
  c = dict(scale.SMALL) if FLAGS.small else {k: getattr(FLAGS, k) for k in scale.SHAPE_FLAGS}
  src, out = _paths(c)
  print(f'model: {scale.param_count(c) / 1e9:.3f} B parameters ({c["dtype"]})', flush=True)
  wrote = scale.child('write', c, work=pathlib.Path(FLAGS.dir))
  if not (out / 'manifest.json').exists() or not json.loads((out / 'manifest.json').read_text()).get('complete'):
    print('compress:', child('compress', c), flush=True)
  rows = {phase: child(phase, c) for phase in PHASES}
  path = lambda phase: pathlib.Path(rows[phase]['path'])
  same = {'compressed-tensors': tensor_digests(path('ct-stream')) == tensor_digests(path('ct-memory')),
          'jxc': file_digest(path('jxc-stream')) == file_digest(path('jxc-memory'))}
  ckpt = wrote['bytes']
  print(f'\ncheckpoint {ckpt / 2**30:.2f} GiB; W4 g{c["group_size"]}, CPU, one run each')
  print('| export | seconds | peak RSS (GiB) | peak RSS / checkpoint | written (GiB) |\n|---|---:|---:|---:|---:|')
  for phase, r in rows.items():
    print(f"| {phase} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} | {100 * r['peak_rss'] / ckpt:.1f}% | "
          f"{r['bytes'] / 2**30:.2f} |")
  print('streamed and in memory the same: ' + ', '.join(f'{k} {v}' for k, v in same.items()))
  results = pathlib.Path(FLAGS.out or pathlib.Path(FLAGS.dir) / 'results')
  results.mkdir(parents=True, exist_ok=True)
  (results / 'export_stream.json').write_text(json.dumps({'config': c, 'checkpoint_bytes': ckpt, **rows,
                                                          'same_tensors': same}, indent=1))


if __name__ == '__main__':
  app.run(main)
