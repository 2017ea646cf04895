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
imported before the reset, which leaves the part that grows with the checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

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

_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jaxcompress import models
status = lambda key: 1024 * int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
jax.block_until_ready(jnp.zeros(1))  # the backend's own memory is not the load's
if sys.argv[2] == '1':  # transformers (which parses config.json) costs ~280 MB once, whatever the model size
  import transformers
  transformers.AutoConfig.from_pretrained(sys.argv[1])
open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to the current RSS
before = status('VmRSS:')
_, params = models.from_pretrained(sys.argv[1])
jax.block_until_ready(params)
param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
print('RESULT ' + json.dumps({'before': before, 'peak': status('VmHWM:'), 'param_bytes': param_bytes}))
"""


def probe(repo: pathlib.Path, directory: pathlib.Path, transformers_first: bool) -> dict:
  res = subprocess.run([sys.executable, '-c', _PROBE, str(directory), str(int(transformers_first))], capture_output=True, text=True,
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
      rows[name] = probe(repo, directory, False)
      rows[name + ', transformers in'] = probe(repo, directory, True)
  print(f'\n{"loader":<40} {"params MiB":>10} {"RSS before":>11} {"peak":>9} {"load peak":>10} {"/ params":>9}')
  for name, r in rows.items():
    print(f'{name:<40} {r["param_bytes"] / 2**20:>10.1f} {r["before"] / 2**20:>11.1f} {r["peak"] / 2**20:>9.1f} '
          f'{r["load_peak"] / 2**20:>10.1f} {r["ratio"]:>9.2f}')


if __name__ == '__main__':
  app.run(main)
