"""`nonzeros` and `stats` on arrays sharded across processes (not fully addressable): a 2-process gloo job,
2 virtual CPU devices each, counts checked against NumPy on the whole array."""

from __future__ import annotations


import numpy as np

import pytest
from tests import multiprocess

SHAPE = (16, 8)


def _data() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  value = rng.normal(size=SHAPE).astype(np.float32)
  value[rng.uniform(size=SHAPE) < 0.25] = 0.0  # some zeros of the value itself
  return value, rng.uniform(size=SHAPE) < 0.6


def expected() -> dict:
  value, mask = _data()
  return {'value_nonzeros': int(np.count_nonzero(value)), 'kept': int(mask.sum()),
          'masked_nonzeros': int(np.count_nonzero(np.where(mask, value, 0))), 'params': 2 * value.size}


def process_main(coordinator: str, process_id: int) -> None:
  import jax
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=2, process_id=process_id)
  from jax.sharding import NamedSharding, PartitionSpec as P

  from jaxcompress import core
  value, mask = _data()
  auto = (jax.sharding.AxisType.Auto,) * 2  # as train.sharding.make_mesh: placement by propagation
  mesh = jax.make_mesh((2, 2), ('rows', 'copies'), axis_types=auto, devices=jax.devices())
  # Rows split over processes, each shard held twice (replicas are counted once).
  put = lambda a, spec: jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])
  v = put(value, P('rows', None))
  m = put(mask, P(None, 'rows'))
  assert not v.is_fully_addressable and not m.is_fully_addressable
  params = {'a': {'kernel': v}, 'b': {'kernel': core.Masked(v, m)}}
  counts = core.stats.leaf_counts(params)
  total = core.stats.summary(params).total
  out = {'value_nonzeros': core.nonzeros(v), 'kept': params['b']['kernel'].kept(),
         'masked_nonzeros': counts['b/kernel'].nonzero, 'params': total.params,
         'stored_b': counts['b/kernel'].stored, 'total_nonzero': total.nonzero}
  multiprocess.result_line(out)
  jax.distributed.shutdown()


@pytest.mark.subprocess
def test_counts_across_two_processes(tmp_path):
  results = multiprocess.run_two_processes(tmp_path, 'tests.core.test_multihost_stats')
  want = expected()
  for got in results:
    assert {k: got[k] for k in want} == want
    assert got['stored_b'] == want['kept'] and got['total_nonzero'] == want['value_nonzeros'] + want['masked_nonzeros']
