"""The same program on 1 device, on 8 virtual devices, and as a 2-process (2-host) job."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.train import pretrain_runs as runs

STEPS = 20
# One block (the flag given last wins): each process compiles every program cold, and compile time grows with
# the unrolled depth; the layouts compared shard every block alike.
ONE_BLOCK = '--num_layers=1'


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  run_dir = tmp_path_factory.mktemp('single')
  runs.run(run_dir, ONE_BLOCK, f'--steps={STEPS}', '--checkpoint_every=0', '--export')
  return run_dir


@pytest.mark.slow
@pytest.mark.subprocess
def test_one_device_and_eight_devices_give_the_same_loss_curve(single, tmp_path):
  runs.run(tmp_path, ONE_BLOCK, f'--steps={STEPS}', '--checkpoint_every=0', '--data=2', '--fsdp=4', devices=8)
  one, eight = runs.losses(single), runs.losses(tmp_path)
  assert sorted(one) == sorted(eight) == list(range(1, STEPS + 1))
  a, b = np.array([one[s] for s in sorted(one)]), np.array([eight[s] for s in sorted(eight)])
  np.testing.assert_allclose(b, a, rtol=1e-5)
  assert a[-1] < a[0]  # it trained


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_hosts_checkpoint_restore_and_match_one_process(single, tmp_path):
  """2 processes x 2 virtual devices (gloo collectives) in a data=2 x fsdp=2 mesh: train to step 8, stop with a
  checkpoint, restore on both processes, finish; compare with the one-device run of the same program."""
  # Checkpoints only where needed (stop_at_step writes one, the end another): each save costs a second or so.
  mesh = [ONE_BLOCK, '--data=2', '--fsdp=2', '--checkpoint_every=0', '--export']
  multi = tmp_path / 'multi'
  for phase, stop in (('a', ['--stop_at_step=8']), ('b', [])):
    port = runs.free_port()
    logs = [tmp_path / f'host{i}{phase}.log' for i in range(2)]
    procs = [runs.start(multi, f'--steps={STEPS}', *mesh, *stop, f'--coordinator=localhost:{port}',
                        '--num_processes=2', f'--process_id={i}', '--cpu_collectives=gloo', devices=2, log=logs[i])
             for i in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
    if stop:
      assert runs.checkpoint_steps(multi)[-1] == 8
  assert 'Resumed from step 8' in (tmp_path / 'host0b.log').read_text()
  # Sharded over 4 devices in 2 processes (gloo) against one device: sums in other orders, so agreement to float32
  # rounding, not bits. (Within one layout, resuming is bit-exact: see test_preemption.)
  one_params = load_file(str(single / 'hf' / 'model.safetensors'))
  two_params = load_file(str(multi / 'hf' / 'model.safetensors'))
  assert sorted(one_params) == sorted(two_params)
  for name in one_params:
    np.testing.assert_allclose(two_params[name], one_params[name], rtol=1e-5, atol=1e-6, err_msg=name)
  one, two = runs.losses(single), runs.losses(multi)
  np.testing.assert_allclose([two[s] for s in range(1, STEPS + 1)], [one[s] for s in range(1, STEPS + 1)],
                             rtol=1e-6)
