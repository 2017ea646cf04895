"""`from_pretrained(shardings=...)` on a 2-process gloo job (2 virtual CPU devices each, FSDP over all 4): every
process holds exactly its slices of the checkpoint, and reads about half of the checkpoint's bytes from disk."""

from __future__ import annotations

import os

import numpy as np

import pytest
from tests import multiprocess



def _model():
  from jaxcompress.models import llama
  return llama.Llama(llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                                       num_heads=4, num_kv_heads=2, max_position_embeddings=64))


def process_main(coordinator: str, process_id: int, directory: str) -> None:
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
  from jax.sharding import NamedSharding

  from jaxcompress import core, models
  from jaxcompress.models import tensor_reader
  from jaxcompress.train import sharding
  read = {'bytes': 0}
  preadv = os.preadv

  def counting(fd, buffers, offset):
    n = preadv(fd, buffers, offset)
    read['bytes'] += n
    return n

  tensor_reader.os.preadv = counting  # this process's own module: counts every data byte it reads
  model = models.load_model(directory)
  mesh = sharding.make_mesh(data=1, fsdp=4)
  specs = sharding.param_specs(model.abstract_params(), mesh, model.sharding_rules())
  _, params = models.from_pretrained(directory, shardings=lambda p, shape: NamedSharding(mesh, specs[p]))
  sharded_bytes = read['bytes']
  _, whole = models.from_pretrained(directory)
  mismatched = []
  for path, arr in core.flatten(params).items():
    full = np.asarray(core.flatten(whole)[path])
    if arr.sharding.spec != specs[path] or any(
        not np.array_equal(np.asarray(s.data), full[s.index]) for s in arr.addressable_shards):
      mismatched.append(path)
  fsdp_split = sum(1 for p, s in specs.items() if 'fsdp' in tuple(s))
  total = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(whole))
  multiprocess.result_line({'read': sharded_bytes, 'total': total, 'mismatched': mismatched,
                            'fsdp_split': fsdp_split})
  jax.distributed.shutdown()


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_read_their_own_slices(tmp_path):
  import jax

  from jaxcompress import models
  model = _model()
  models.save_pretrained(tmp_path / 'ckpt', model, model.init(jax.random.key(0)))
  results = multiprocess.run_two_processes(tmp_path, 'tests.models.test_sharded_load', str(tmp_path / 'ckpt'))
  for got in results:
    print(f"process read {got['read']} of {got['total']} checkpoint bytes ({got['read'] / got['total']:.2f})")
    assert got['mismatched'] == [] and got['fsdp_split'] >= 7
    # Every fsdp-split weight is read half by each process; only the small norm scales are read whole.
    assert 0.45 * got['total'] <= got['read'] <= 0.6 * got['total'], got
