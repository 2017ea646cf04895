"""How this test session has XLA build programs, for a module that needs other settings than the suite's
(tests/conftest.py compiles without XLA's backend optimizations and with `FAST_COMPILE`)."""

from __future__ import annotations

import os

# XLA flags of the test session, here and in every process a test starts: XLA's CPU fusion emitters off (its older
# emitters compile the suite's programs in about two thirds of the time; what they compute is checked by the same
# tests, and the recorded-init bits do not change). Device counts are added per process (`xla_flags`).
FAST_COMPILE = '--xla_cpu_use_fusion_emitters=false'


def xla_flags(devices: int | None = None, *more: str) -> str:
  """XLA_FLAGS for a process a test starts: `FAST_COMPILE`, `devices` virtual CPU devices, and `more` flags."""
  count = () if devices is None else (f'--xla_force_host_platform_device_count={devices}',)
  return ' '.join((*count, *more, FAST_COMPILE))


def environ(**changes: str) -> dict[str, str]:
  """os.environ for a process a test starts with XLA_FLAGS = `xla_flags()` (the session's flags, no device
  count) and `changes`."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(), **changes}


def full_optimizations():
  """Body of a module-scoped fixture: the module's programs are compiled with XLA's backend optimizations, as users'
  programs are (for bits recorded from them). The setting is restored after the module. The setting is not part of
  jit's cache key, so the module must compile only programs no later module calls: a fresh `jax.jit` of a
  function of its own, with no eager operation outside it. (Clearing every cache instead took 8 s at the end of a
  worker's share of the suite, and made the modules after it compile again.)"""
  import jax
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
