"""How this test session has XLA build programs, for a module that needs other settings than the suite's
(tests/conftest.py compiles without XLA's backend optimizations)."""

from __future__ import annotations

import jax


def full_optimizations():
  """Body of a module-scoped fixture: the module's programs are compiled with XLA's backend optimizations, as users'
  programs are (for bits recorded from them). The setting is restored after the module and its compiled programs
  dropped from memory, so no later module runs one of them (the persistent compilation cache keys them apart)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
    jax.clear_caches()
