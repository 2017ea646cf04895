"""Computes the calibration statistics of sharded_run.py and the weight-parallel solves of parallel_run.py
in one process, for test_sharded.py, and writes them (process 0) to OUT_DIR:

    python tests/calibration/mesh_run.py OUT_DIR CHECKPOINT
        # 8 virtual devices: on the default device (one_*.npz) and on meshes of all 8 (eight_*.npz)
    python tests/calibration/mesh_run.py OUT_DIR CHECKPOINT --coordinator=localhost:PORT --num_processes=2
        --process_id=I   # one of 2 processes of 2 devices each (gloo): two_*.npz

The out-of-core compression of CHECKPOINT goes to OUT_DIR/one_solve.ooc (1 device) and two_solve.ooc.
"""

import argparse
import faulthandler
import sys
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project root, for `tests.` imports


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('out_dir')
  parser.add_argument('checkpoint')
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  args = parser.parse_args()
  faulthandler.dump_traceback_later(500, exit=True)  # a stuck run says where, before the test's timeout
  if args.coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
  jax.config.update('jax_default_matmul_precision', 'highest')

  import numpy as np
  from tests.calibration import parallel_run, sharded_run

  out = Path(args.out_dir)
  if jax.process_count() == 1:
    assert jax.device_count() == 8, jax.devices()
    results = {
        'one_stats': sharded_run.statistics(),
        'eight_stats': sharded_run.statistics('4x2', det_mesh='8x1'),
        'one_solve': parallel_run.solutions(False, ooc=args.checkpoint, ooc_out=str(out / 'one_solve.ooc')),
        'eight_solve': parallel_run.solutions(True),  # out of core on a mesh: the 2-process run
    }
  else:
    assert jax.device_count() == 4, jax.devices()
    results = {
        'two_stats': sharded_run.statistics('4x1', offload=True),
        'two_solve': parallel_run.solutions(True, ooc=args.checkpoint, ooc_out=str(out / 'two_solve.ooc')),
    }
  if jax.process_index() == 0:
    for name, arrays in results.items():
      np.savez(out / f'{name}.npz', **arrays)


if __name__ == '__main__':
  main()
