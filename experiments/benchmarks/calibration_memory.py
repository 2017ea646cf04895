"""Memory of streaming calibration as the calibration set grows, and of sequential mode against one block.

    python experiments/benchmarks/calibration_memory.py                  # small Llama, 1 and 8 batches
    python experiments/benchmarks/calibration_memory.py --hidden 512 --intermediate 1376 --seq_len 512

Each batch count runs in a fresh subprocess (peak RSS is per process) that calibrates a random Llama with
parameters on the host (numpy) and the `hessian()` observer, and prints one JSON line:
- peak RSS of the process (resource.getrusage), before and after calibrating, and the hidden states
  [B, T, D] kept on the host for the next block (the one thing that grows with the batches, by design);
- peak live device bytes between steps (`jax.live_arrays()`, probed after every step through `on_step`),
  plus the temporaries XLA reserves inside one block step (its compiled memory analysis);
- what whole-batch capture (`Model.linear_inputs` over the calibration set) would have to hold instead;
- for sequential mode (`run_sequential`, identity compression, hidden states offloaded): peak live device
  bytes while the blocks run, against one block's parameters + its statistics + one batch's hidden states.
On CPU the "device" is host memory too; live device bytes are what JAX holds, RSS is everything.
"""

from __future__ import annotations

import json
import pathlib
import resource
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]

import jax
import numpy as np
from absl import app, flags

from jaxcompress import calibration, models

from experiments.benchmarks.benchlib import memory_need

_HIDDEN = flags.DEFINE_integer('hidden', 256, 'Hidden size d_model.')
_INTERMEDIATE = flags.DEFINE_integer('intermediate', 688, 'SwiGLU MLP width.')
_LAYERS = flags.DEFINE_integer('layers', 4, 'Number of transformer blocks.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Attention heads.')
_VOCAB = flags.DEFINE_integer('vocab', 2048, 'Vocabulary size.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Sequences per calibration batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
_COUNTS = flags.DEFINE_list('batches', ['1', '8'], 'Numbers of calibration batches, each run in a fresh process.')
_OFFLOAD = flags.DEFINE_boolean('offload', True, 'Keep hidden states on the host between blocks.')
_WORKER = flags.DEFINE_integer('worker', 0, 'Internal: run one measurement with this many batches.')

MIB = 2**20


def peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def nbytes(tree) -> int:
  return sum(np.asarray(x).nbytes if not hasattr(x, 'nbytes') else x.nbytes for x in jax.tree.leaves(tree))


def live_probe(phases: tuple[str, ...]):
  """(on_step callback, high-water mark list): max live device bytes over the steps of the given phases."""
  high = [0]

  def probe(phase, block, batch):
    if phase in phases:
      high[0] = max(high[0], sum(a.nbytes for a in jax.live_arrays()))

  return probe, high


def worker(n: int) -> dict:
  model = models.Llama(models.LlamaConfig(
      vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_INTERMEDIATE.value,
      num_layers=_LAYERS.value, num_heads=_HEADS.value, num_kv_heads=_HEADS.value,
      max_position_embeddings=_SEQ_LEN.value))
  params = jax.device_get(jax.jit(model.init)(jax.random.key(0)))  # parameters stay on the host
  rs = np.random.RandomState(0)
  batches = [rs.randint(0, _VOCAB.value, (_BATCH.value, _SEQ_LEN.value)).astype(np.int32) for _ in range(n)]
  observer = calibration.hessian()
  rss_before = peak_rss()

  probe, high = live_probe(('stats', 'head'))
  stats = calibration.calibrate(model, params, batches, observer, offload=_OFFLOAD.value, on_step=probe)
  rss_after = peak_rss()

  # XLA temporaries inside one block step (live arrays cannot see them)
  block = jax.device_put(model.block_params(params, 0))
  h = jax.numpy.zeros((_BATCH.value, _SEQ_LEN.value, _HIDDEN.value), jax.numpy.float32)
  rows = calibration.Rows(jax.numpy.asarray(batches[0]))
  init = {p: observer.init(p, s['xtx'].shape[0]) for p, s in stats.items() if p.startswith('layers/0/')}
  init = {p.removeprefix('layers/0/'): s for p, s in init.items()}
  step = calibration.driver._block_step.lower(model, observer, block, h, rows, init, shardings=None, outputs=True)
  step_memory = memory_need(step.compile())

  tokens = _BATCH.value * _SEQ_LEN.value
  capture = sum(tokens * s['xtx'].shape[0] * 4 for s in stats.values()) * n  # float32 inputs, every linear
  block_bytes = nbytes(params['layers'][0])
  block_stats = sum(nbytes(s) for p, s in stats.items() if p.startswith('layers/0/'))
  del stats, block, init

  seq_probe, seq_high = live_probe(('stats', 'forward'))
  calibration.run_sequential(model, params, batches, observer, lambda i, bp, s: bp, offload=True,
                             keep_stats=False, on_step=seq_probe)
  device_stats = jax.devices()[0].memory_stats() or {}  # None on CPU; GPUs and TPUs report a true peak
  return {
      'device_peak_bytes_in_use': device_stats.get('peak_bytes_in_use'),
      'batches': n, 'tokens': n * tokens, 'params_bytes': nbytes(params),
      'rss_before_calibrate': rss_before, 'rss_peak': rss_after,
      'live_device_peak': high[0], 'block_step_temp': step_memory['temp'],
      'whole_batch_capture_bytes': capture,
      'sequential_live_device_peak': seq_high[0], 'one_block_bytes': block_bytes,
      'one_block_stats_bytes': block_stats, 'one_batch_hidden_bytes': tokens * _HIDDEN.value * 4}


def main(argv) -> None:
  del argv
  if _WORKER.value:
    print('RESULT ' + json.dumps(worker(_WORKER.value)), flush=True)
    return
  flags_out = [f'--{f.name}={f.value}' for f in (_HIDDEN, _INTERMEDIATE, _LAYERS, _HEADS, _VOCAB, _BATCH, _SEQ_LEN)]
  flags_out.append(f'--offload={_OFFLOAD.value}')
  results = []
  for n in (int(c) for c in _COUNTS.value):
    proc = subprocess.run([sys.executable, __file__, f'--worker={n}', *flags_out], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
      raise SystemExit(f'worker with {n} batches failed:\n{proc.stderr[-3000:]}')
    line = next(l for l in proc.stdout.splitlines() if l.startswith('RESULT '))
    results.append(json.loads(line.removeprefix('RESULT ')))
  print(f'Llama d={_HIDDEN.value} ff={_INTERMEDIATE.value} L={_LAYERS.value} vocab={_VOCAB.value}, '
        f'batches of {_BATCH.value}x{_SEQ_LEN.value} tokens, params {results[0]["params_bytes"] / MIB:.1f} MiB '
        f'on the host, hidden states {"offloaded" if _OFFLOAD.value else "on the device"}')
  print(f'{"batches":>8} {"tokens":>8} {"peak RSS":>10} {"RSS growth":>11} {"hidden kept":>12} '
        f'{"live device":>12} {"step temp":>10} {"capture would hold":>19}')
  for r in results:
    print(f'{r["batches"]:>8} {r["tokens"]:>8} {r["rss_peak"] / MIB:>8.1f}Mi '
          f'{(r["rss_peak"] - r["rss_before_calibrate"]) / MIB:>9.1f}Mi '
          f'{r["batches"] * r["one_batch_hidden_bytes"] / MIB:>10.1f}Mi {r["live_device_peak"] / MIB:>10.2f}Mi '
          f'{r["block_step_temp"] / MIB:>8.2f}Mi {r["whole_batch_capture_bytes"] / MIB:>17.1f}Mi')
    if r['device_peak_bytes_in_use'] is not None:
      print(f'{"":>8} device peak_bytes_in_use {r["device_peak_bytes_in_use"] / MIB:.1f} MiB (whole process)')
  print('sequential mode (run_sequential, parameters on the host, one block on the device at a time):')
  for r in results:
    one = r['one_block_bytes'] + r['one_block_stats_bytes'] + r['one_batch_hidden_bytes']
    print(f'  {r["batches"]} batches: peak live device {r["sequential_live_device_peak"] / MIB:.2f} MiB; one block '
          f'{r["one_block_bytes"] / MIB:.2f} MiB + its stats {r["one_block_stats_bytes"] / MIB:.2f} MiB + one '
          f'batch of hidden states {r["one_batch_hidden_bytes"] / MIB:.2f} MiB = {one / MIB:.2f} MiB; all '
          f'parameters {r["params_bytes"] / MIB:.1f} MiB')


if __name__ == '__main__':
  app.run(main)
