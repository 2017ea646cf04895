"""How this test session has XLA build programs, for a test module and for the Python processes tests start."""

from __future__ import annotations

import os

import jax


def quick_compiles():
  """Body of a module-scoped fixture: the module's programs are compiled without XLA's backend optimizations
  (`jax_disable_most_optimizations`), about a third less compile time on CPU, where these tests spend most of
  theirs; they check what the programs compute, not how fast the programs run. The setting is restored after the
  module and its compiled programs dropped from memory, so no later module runs one of them (the persistent
  compilation cache keys them apart)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
    if not previous:
      jax.clear_caches()


def child_env(**extra: str) -> dict:
  """os.environ for a child Python that builds its programs as this process does: the matmul precision and the
  optimization setting are jax.config values here (tests/conftest.py, `quick_compiles`), which a child reads from
  its environment. The child then runs the programs this process compiled, and the shared compilation cache
  serves them instead of compiling them again. `extra` overrides."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'}
  precision = jax.config.jax_default_matmul_precision
  if precision is not None:
    env['JAX_DEFAULT_MATMUL_PRECISION'] = str(precision)
  env['JAX_DISABLE_MOST_OPTIMIZATIONS'] = str(bool(jax.config.read('jax_disable_most_optimizations'))).lower()
  return {**env, **extra}
