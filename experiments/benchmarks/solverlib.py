"""Timing of the one-shot layer solvers (SparseGPT, GPTQ) phase by phase, in wall and process CPU seconds.

Phases: XᵀX, the damped inverse-Hessian factor (dead inputs + damping + upper Cholesky of H⁻¹, one jitted
program), the blocked row loop, and the compile time of each of these programs. The machine these run on may be
shared, so the process CPU time is printed next to the wall time (it counts both cores' work of this process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.calibration import inverse_hessian
from jaxcompress.pruning._src import sparsegpt as sparsegpt_lib
from jaxcompress.quantization._src import gptq as gptq_lib


def wall_cpu(fn: Callable[[], Any]) -> tuple[Any, float, float]:
  """(result, wall seconds, process CPU seconds) of fn(), waited on until the result is ready."""
  t, c = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t, time.process_time() - c


def first_and_steady(fn: Callable[[], Any], repeats: int) -> dict[str, Any]:
  """The first call (compile included, when nothing of it is compiled yet) and `repeats` steady calls."""
  _, wall, cpu = wall_cpu(fn)
  steady = [wall_cpu(fn)[1:] for _ in range(repeats)]
  return {'first_wall_s': wall, 'first_cpu_s': cpu, 'steady_wall_s': [s[0] for s in steady],
          'steady_cpu_s': [s[1] for s in steady]}


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
  """(result, wall s, CPU s) of the call with the least CPU time of `repeats` (the least disturbed by load)."""
  runs = [wall_cpu(fn) for _ in range(repeats)]
  return min(runs, key=lambda r: r[2])


def phases(w: jax.Array, x: jax.Array, method: str, repeats: int = 3, **kw) -> dict[str, tuple[float, float]]:
  """{phase: (wall s, cpu s)} for method 'sparsegpt' (kw: sparsity, nm, block_size) or 'gptq' (kw: bits,
  group_size, act_order, symmetric, block_size). Run phases after the public function was called once: the run
  times are then steady (best of `repeats`), and the compile times are measured after `jax.clear_caches()`."""
  act = bool(kw.get('act_order', False))
  damp = jnp.float32(0.01)
  out = {}
  h, *out['xtx'] = best_of(lambda: inverse_hessian.xtx(x), repeats)
  (u, dead, perm, _), *out['factor'] = best_of(lambda: inverse_hessian._factor(h, damp, act_order=act), repeats)
  if method == 'sparsegpt':
    sparsity = jnp.float32(kw.pop('sparsity', 0.5))
    args, solve = (w, u, dead, sparsity), sparsegpt_lib._solve
  else:
    args, solve = (w, u, dead, perm), gptq_lib._solve
  _, *out['loop'] = best_of(lambda: solve(*args, **kw), repeats)
  jax.clear_caches()
  _, *out['compile_xtx'] = wall_cpu(lambda: inverse_hessian.xtx.lower(x).compile())
  _, *out['compile_factor'] = wall_cpu(lambda: inverse_hessian._factor.lower(h, damp, act_order=act).compile())
  _, *out['compile_loop'] = wall_cpu(lambda: solve.lower(*args, **kw).compile())
  return {k: tuple(v) for k, v in out.items()}


def report(name: str, times: dict[str, Any], parts: dict[str, tuple[float, float]]) -> str:
  """Lines: first call and steady (wall / cpu), then each phase."""
  lines = [f"{name}: first result (compile included) {times['first_wall_s']:.2f} s wall, "
           f"{times['first_cpu_s']:.2f} s CPU; steady {min(times['steady_wall_s']):.2f} s wall, "
           f"{min(times['steady_cpu_s']):.2f} s CPU (best of {len(times['steady_wall_s'])})"]
  for k, (wall, cpu) in parts.items():
    lines.append(f'  {k:<15} {wall:7.3f} s wall {cpu:7.3f} s CPU')
  total = sum(c for k, (_, c) in parts.items())
  lines.append(f'  {"sum of phases":<15} {sum(w for w, _ in parts.values()):7.3f} s wall {total:7.3f} s CPU')
  return '\n'.join(lines)
