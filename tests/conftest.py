"""Shared fixtures: tiny random Hugging Face models built offline with transformers + torch, and one XLA
compilation cache for the session."""

from __future__ import annotations

import os

import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
# One XLA compilation cache for the whole test session, shared with the subprocesses tests start: the same
# programs are compiled over and over (every fit, every pretrain run), and each compile costs seconds on CPU.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jaxcompress-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax
import pytest

from tests.reference_models import tiny_reference


# The README runs the suite on two pytest-xdist workers that take whole files in collection order. The engine and
# recipe tests come last alphabetically and are also the longest (subprocess scripts, multi-process jobs, training
# runs); started last, one worker would finish them alone while the other sits idle. So they start first.
_FIRST = ('tests/recipes/', 'tests/train/')


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: not item.nodeid.startswith(_FIRST))  # stable: file and test order kept otherwise


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
