"""Runs a test module's `process_main` as a real 2-process JAX job (gloo collectives) and reads its results.

Each process prints one line `RESULT <json>`; `run_two_processes` returns those dicts, in process order.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from tests.train.pretrain_runs import free_port
from tests import xla_settings

REPO = pathlib.Path(__file__).resolve().parents[1]


def result_line(payload: dict) -> None:
  """What `process_main` prints for `run_two_processes` to read."""
  print('RESULT ' + json.dumps(payload), flush=True)


def run_two_processes(tmp_path: pathlib.Path, module: str, *args: str, devices: int = 2) -> list[dict]:
  """Calls `module.process_main(coordinator, process_id, *args)` in 2 processes of `devices` CPU devices each."""
  coordinator = f'localhost:{free_port()}'
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(XLA_FLAGS=xla_settings.xla_flags(devices, '--xla_cpu_collective_call_terminate_timeout_seconds=900'),
             JAX_PLATFORMS='cpu',
             PYTHONPATH=str(REPO))
  code = f'import sys, {module} as t; t.process_main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])'
  logs = [tmp_path / f'p{i}.log' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-c', code, coordinator, str(i), *args], cwd=REPO, env=env,
                            stdout=log.open('w'), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
  try:
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [0, 0], [log.read_text()[-3000:] for log in logs]
  return [json.loads(next(line for line in log.read_text().splitlines() if line.startswith('RESULT '))[7:])
          for log in logs]
