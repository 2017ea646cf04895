"""launch/local_multihost.sh forwards SIGTERM to every process and reports their own exit status."""

import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / 'launch' / 'local_multihost.sh'

# Stands in for a training script: saves (sleeps) on SIGTERM, then exits with the given status.
CHILD = textwrap.dedent('''
    import signal, sys, time
    def stop(*_):
      time.sleep(0.5)  # the checkpoint write
      sys.exit({code})
    signal.signal(signal.SIGTERM, stop)
    print('ready', flush=True)
    time.sleep(120)
''')


@pytest.mark.subprocess
@pytest.mark.parametrize('code', [0, 3])
def test_sigterm_exit_status_is_the_processes_own(tmp_path, code):
  script = tmp_path / 'child.py'
  script.write_text(CHILD.format(code=code))
  proc = subprocess.Popen(['bash', str(LAUNCH), '2', '1', str(script)], stdout=subprocess.PIPE, text=True,
                          cwd=ROOT)
  try:
    seen = ''  # both processes share the pipe: their lines may interleave, so count words, not lines
    while seen.count('ready') < 2:
      line = proc.stdout.readline()
      assert line, f'the launcher ended before both processes were ready: {seen!r}'
      seen += line
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == code
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.stdout.close()
