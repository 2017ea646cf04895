"""Shared fixtures: tiny random Hugging Face models built offline with transformers + torch, one XLA compilation
cache for the session, and Python's byte-code cache on for the processes it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
# The suite starts about sixty Python processes (two workers, command lines, multi-process jobs), each importing
# jax, flax, transformers and often torch. Where PYTHONDONTWRITEBYTECODE is set (as on the CI machines) and the
# install did not byte-compile them, every one of those processes would compile the same sources again: the
# modules are compiled once, on first import, for the whole session instead.
os.environ.pop('PYTHONDONTWRITEBYTECODE', None)
sys.dont_write_bytecode = False
# One XLA compilation cache for the whole test session, shared with the subprocesses tests start: the same
# programs are compiled over and over (every fit, every pretrain run), and each compile costs seconds on CPU.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxcompress-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
# The suite checks what programs compute, not how fast they run, and spends most of its time compiling them: XLA's
# backend optimizations are off (about a third less compile time on CPU), here and in every process a test starts
# (they inherit the variable). A module checking bits recorded from the optimized programs users run turns them back
# on (`tests.xla_settings.full_optimizations`).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
from tests import xla_settings  # noqa: E402 (before jax: XLA reads its flags once)

if xla_settings.FAST_COMPILE not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {xla_settings.FAST_COMPILE}".strip()

import jax
import pytest

from tests.reference_models import tiny_reference


# The README runs the suite on two pytest-xdist workers that take whole files. The engine and recipe tests come last
# alphabetically and are among the longest (subprocess scripts, multi-process jobs, training runs), so they come
# first here. xdist itself hands out the files with the most tests first, so this order only breaks its ties; an
# order of its own (xdist's reordering off, files by their count of slow tests) measured no faster: 660 s against
# 653 s, the two workers within about 20 s of each other either way.
_FIRST = ('tests/recipes/', 'tests/train/')


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))  # stable: file and test order kept otherwise


# Markers of the contributor's fast loop (`pytest -m 'not slow and not subprocess'`), kept true: a test that starts
# a Python process without the `subprocess` marker fails, and an unmarked test over SLOW_S seconds is listed at the
# end of the run (timings vary with the machine's load, so that is a report, never a failure).
SLOW_S = float(os.environ.get('JAXCOMPRESS_SLOW_S', 10.0))
_unmarked_slow: list[tuple[str, float]] = []


def _starts_python(cmd) -> bool:
  prog = (cmd[0] if isinstance(cmd, (list, tuple)) and cmd else str(cmd or '').split(' ')[0]) or ''
  name = os.path.basename(str(prog))
  return str(prog) == sys.executable or name.startswith(('python', 'jaxcompress-'))


@pytest.fixture(autouse=True)
def _process_marker(request, monkeypatch):
  if request.node.get_closest_marker('subprocess') is None:
    real = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):
      if _starts_python(args):
        raise AssertionError(f'{request.node.nodeid} starts a Python process ({args!r:.120}); mark it '
                             '@pytest.mark.subprocess so the fast loop can leave it out.')
      real(self, args, *rest, **kwargs)
    monkeypatch.setattr(subprocess.Popen, '__init__', init)
  yield


def pytest_runtest_logreport(report):  # also on the controller of an xdist run, which receives every report
  if report.when == 'call' and report.duration > SLOW_S and 'slow' not in report.keywords:
    _unmarked_slow.append((report.nodeid, report.duration))


def pytest_terminal_summary(terminalreporter):
  if _unmarked_slow:
    terminalreporter.write_line(f'tests over {SLOW_S:.0f} s without the slow marker (mark them @pytest.mark.slow):')
    for nodeid, took in sorted(_unmarked_slow, key=lambda x: -x[1]):
      terminalreporter.write_line(f'  {took:6.1f} s  {nodeid}')


@pytest.fixture(scope='session')
def hf_checkpoint(tmp_path_factory):
  """hf_checkpoint(kind) -> (directory, torch model); each kind built once per session."""
  cache = {}

  def make(kind: str):
    if kind not in cache:
      model = tiny_reference(kind)
      path = tmp_path_factory.mktemp(kind)
      model.save_pretrained(str(path))
      cache[kind] = (path, model)
    return cache[kind]

  return make


@pytest.fixture(autouse=True, scope='session')
def _full_precision_matmuls():
  jax.config.update('jax_default_matmul_precision', 'highest')
  yield
