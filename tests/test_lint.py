"""The code passes the lint configuration of pyproject.toml ([tool.ruff])."""

import pathlib
import subprocess

from ruff.__main__ import find_ruff_bin  # the `test` extra installs ruff

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_passes():
  proc = subprocess.run([find_ruff_bin(), 'check', '--no-cache', 'jaxcompress', 'experiments', 'tests'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
