"""Peak host memory of `models.from_pretrained`, against the bytes of the parameters it loads.

    python experiments/benchmarks/load_memory.py              # the ~100M-parameter Llama of vs_torch.py
    python experiments/benchmarks/load_memory.py --small      # seconds
    python experiments/benchmarks/load_memory.py --compare=/path/to/other/checkout   # also that code's loader

A random Llama checkpoint (tied head, float32) is written with `save_pretrained`; a fresh interpreter imports
jax and jaxcompress, starts the CPU backend, resets its peak-RSS counter (`/proc/self/clear_refs`), loads the
checkpoint and reads VmHWM from /proc/self/status (not getrusage's ru_maxrss, which survives exec). The load's
peak is VmHWM minus the resident memory just before loading; the goal is at most 1.15x the parameter bytes
(the parameters themselves plus about one tensor in flight). Each loader is measured twice: as a user calls it,
and with transformers (which from_pretrained imports to parse config.json: ~280 MB, whatever the model size)
imported before the reset, which leaves the part that grows with the checkpoint. Most of that fixed cost is
torch: transformers' config module imports it whenever it is installed (the test and demo extras install it; the
base install does not, and jaxcompress never needs it). The third measurement hides torch from the probe, as the
base install would.
"""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]

import jax
from absl import app, flags

from jaxcompress import models
from jaxcompress.models import llama

_HIDDEN = flags.DEFINE_integer('hidden', 768, 'Hidden size.')
_LAYERS = flags.DEFINE_integer('layers', 12, 'Transformer blocks.')
_VOCAB = flags.DEFINE_integer('vocab', 32000, 'Vocabulary (tied head).')
_SMALL = flags.DEFINE_boolean('small', False, 'Smoke size: 2 blocks, 128 wide, vocab 1024.')
_COMPARE = flags.DEFINE_string('compare', None, 'Another checkout whose loader is measured too (same file).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random weights.')
_FSDP = flags.DEFINE_boolean('fsdp', True, 'Also load with FSDP over 2 gloo processes x 2 CPU devices each.')

_PROBE = """
import json, sys
if sys.argv[2] == 'no_torch':  # as in the base install (`pip install -e .`), which has no torch
  sys.modules['torch'] = None
import jax, jax.numpy as jnp
from jaxcompress import models
status = lambda key: 1024 * int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
jax.block_until_ready(jnp.zeros(1))  # the backend's own memory is not the load's
if sys.argv[2] == 'transformers_first':  # transformers (which parses config.json) costs ~280 MB once, whatever the model size
  import transformers
  transformers.AutoConfig.from_pretrained(sys.argv[1])
open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to the current RSS
before = status('VmRSS:')
_, params = models.from_pretrained(sys.argv[1])
jax.block_until_ready(params)
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
print('RESULT ' + json.dumps({'before': before, 'peak': status('VmHWM:'), 'param_bytes': param_bytes}))
"""

# One process of a 2-process gloo job, 2 CPU devices each, parameters FSDP-split over all 4: its load peak, the
# bytes it read from the checkpoint (counted at the reader's preadv) and the bytes its devices hold.
_FSDP_PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
coordinator, process_id, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
from jax.sharding import NamedSharding
from jaxcompress import models
from jaxcompress.models import tensor_reader
from jaxcompress.train import sharding
status = lambda key: 1024 * int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
read = [0]
preadv = os.preadv
def counting(fd, buffers, offset):
  n = preadv(fd, buffers, offset)
  read[0] += n
  return n
tensor_reader.os.preadv = counting
model = models.load_model(directory)  # imports what parsing the config needs before the reset
mesh = sharding.make_mesh(data=1, fsdp=4)
specs = sharding.param_specs(model.abstract_params(), mesh, model.sharding_rules())
jax.block_until_ready(jnp.zeros(1))
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS:')
_, params = models.from_pretrained(directory, shardings=lambda p, shape: NamedSharding(mesh, specs[p]))
jax.block_until_ready(params)
held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
total = sum(x.nbytes for x in jax.tree.leaves(params))
print('RESULT ' + json.dumps({'before': before, 'peak': status('VmHWM:'), 'held': held, 'read': read[0],
                              'param_bytes': total}), flush=True)
jax.distributed.shutdown()
"""


def fsdp_probe(repo: pathlib.Path, directory: pathlib.Path) -> list[dict]:
  """Both processes' results of `_FSDP_PROBE`."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = {'PYTHONPATH': str(repo), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin',
         'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  procs = [subprocess.Popen([sys.executable, '-c', _FSDP_PROBE, f'localhost:{port}', str(i), str(directory)],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  results = []
  for p, (out, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f'FSDP load probe in {repo} failed:\n{err[-2000:]}')
    r = json.loads(next(l for l in out.splitlines() if l.startswith('RESULT '))[7:])
    r['load_peak'] = r['peak'] - r['before']
    results.append(r)
  return results


def probe(repo: pathlib.Path, directory: pathlib.Path, mode: str) -> dict:
  res = subprocess.run([sys.executable, '-c', _PROBE, str(directory), mode], capture_output=True, text=True,
                       cwd=repo, env={'PYTHONPATH': str(repo), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  if res.returncode:
    raise RuntimeError(f'load probe in {repo} failed:\n{res.stderr[-2000:]}')
  out = json.loads(next(l for l in res.stdout.splitlines() if l.startswith('RESULT '))[7:])
  out['load_peak'] = out['peak'] - out['before']
  out['ratio'] = out['load_peak'] / out['param_bytes']
  return out


def main(argv: list[str]) -> None:
  del argv
  hidden, layers, vocab = (128, 2, 1024) if _SMALL.value else (_HIDDEN.value, _LAYERS.value, _VOCAB.value)
  model = llama.Llama(llama.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                        num_layers=layers, num_heads=hidden // 64, num_kv_heads=hidden // 192 or 1,
                                        max_position_embeddings=1024, tie_embeddings=True))
  with tempfile.TemporaryDirectory() as tmp:
    directory = pathlib.Path(tmp)
    models.save_pretrained(directory, model, model.init(jax.random.key(_SEED.value)))
    rows = {}
    for repo in [REPO] + ([pathlib.Path(_COMPARE.value)] if _COMPARE.value else []):
      name = 'this checkout' if repo == REPO else str(repo)
      rows[name] = probe(repo, directory, 'plain')
      rows[name + ', transformers in'] = probe(repo, directory, 'transformers_first')
      rows[name + ', no torch'] = probe(repo, directory, 'no_torch')
    fsdp = fsdp_probe(REPO, directory) if _FSDP.value else []
  print(f'\n{"loader":<40} {"params MiB":>10} {"RSS before":>11} {"peak":>9} {"load peak":>10} {"/ params":>9}')
  for name, r in rows.items():
    print(f'{name:<40} {r["param_bytes"] / 2**20:>10.1f} {r["before"] / 2**20:>11.1f} {r["peak"] / 2**20:>9.1f} '
          f'{r["load_peak"] / 2**20:>10.1f} {r["ratio"]:>9.2f}')
  if fsdp:
    print('\nFSDP over 2 processes x 2 CPU devices (each process holds half of every split tensor):')
    print(f'{"process":<8} {"params MiB":>10} {"held MiB":>9} {"read MiB":>9} {"load peak":>10} '
          f'{"/ held":>7} {"/ params":>9}')
    for i, r in enumerate(fsdp):
      print(f'{i:<8} {r["param_bytes"] / 2**20:>10.1f} {r["held"] / 2**20:>9.1f} {r["read"] / 2**20:>9.1f} '
            f'{r["load_peak"] / 2**20:>10.1f} {r["load_peak"] / r["held"]:>7.2f} '
            f'{r["load_peak"] / r["param_bytes"]:>9.2f}')


if __name__ == '__main__':
  app.run(main)
