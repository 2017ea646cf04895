"""Weight-parallel solves: the independent layer problems of a block spread over the devices.

    results = solve_parallel(solve, {'mlp/gate_proj/kernel': (w_gate, h), 'mlp/up_proj/kernel': (w_up, h)},
                             mesh=mesh, traceable=True)

Within one block the solves of its linears are independent given their statistics (gate and up, q and o, k
and v have the same shapes), so they need not run one after another on one device. Problems are grouped by
the shapes and dtypes of their arguments; each group is stacked on a new leading axis (padded with copies of
its last problem to a multiple of the device count) and solved at once:

  traceable=True: `jax.shard_map(jax.vmap(solve))` over the mesh axis, one slice of the stack per device
    (works across processes; every process passes all problems, as calibration leaves the statistics
    replicated); the results are gathered on every process's host.
  traceable=False: for solvers with host-side checks (they call bool() on arrays, e.g.
    `pruning.sparsegpt_from_hessian`), problems go round-robin to the mesh's devices, one thread per local
    device, and come back to the host. Across processes each process solves the problems of its own devices
    and the results are exchanged (every process passes all problems and gets all results).

Each problem runs the same computation as `solve(*args)` alone, so the results do not depend on the device
count (tests: 1 vs 8 devices, bit for bit).
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcompress import core

Solve = Callable[..., Any]  # solve(*arrays) -> a pytree (e.g. a core.Masked or core.Quantized leaf)


def solve_parallel(solve: Solve, problems: Mapping[str, tuple], *, mesh: Mesh | None = None,
                   axis: str | tuple[str, ...] = 'data', traceable: bool = False) -> dict[str, Any]:
  """{name: solve(*problems[name])} for independent problems, spread over the mesh's devices.

  problems: {name: tuple of arrays}; problems with equal argument shapes/dtypes are solved together.
  mesh, axis: the devices and the mesh axis (or axes) the stacked problems are split over; None: one by
    one on the default device.
  traceable: solve can be traced (jit/vmap; no host-side checks): shard_map path, else threads per device.
  Returns the results in the order of `problems`; traceable results are host numpy pytrees.
  """
  if not callable(solve):
    raise TypeError(f'solve_parallel: solve={solve!r} must be a function (*arrays) -> pytree.')
  for name, args in problems.items():
    if not isinstance(args, tuple):
      raise TypeError(f"solve_parallel: problem '{name}' is a {type(args).__name__}; give a tuple of arrays.")
  if mesh is None:
    return {name: solve(*args) for name, args in problems.items()}
  if traceable:
    out = {}
    for names in _groups(problems).values():
      out.update(_shard_map_group(solve, [problems[n] for n in names], names, mesh, axis))
    return {n: out[n] for n in problems}
  return _threaded(solve, problems, list(mesh.devices.flat))


def _process_local(a):
  """An array replicated over several processes' devices (a block calibrated over a multi-process mesh) ->
  this process's copy, which it can move to one of its devices."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    if not a.is_fully_replicated:
      raise ValueError(f'solve_parallel: a problem array of shape {a.shape} is split over processes; give '
                       'replicated or host arrays (each problem is solved whole on one device).')
    return a.addressable_data(0)
  return a


def _groups(problems: Mapping[str, tuple]) -> dict[tuple, list[str]]:
  groups: dict[tuple, list[str]] = {}
  for name, args in problems.items():
    sig = tuple((tuple(np.shape(a)), str(np.asarray(a).dtype if not hasattr(a, 'dtype') else a.dtype))
                for a in args)
    groups.setdefault(sig, []).append(name)
  return groups


def _shard_map_group(solve, args_list, names, mesh, axis) -> dict[str, Any]:
  axes = axis if isinstance(axis, tuple) else (axis,)
  d = math.prod(mesh.shape[a] for a in axes)
  n = len(args_list)
  padded = args_list + [args_list[-1]] * (-n % d)
  stacked = [np.stack([np.asarray(jax.device_get(_process_local(a[k]))) for a in padded])
             for k in range(len(args_list[0]))]
  spec = PartitionSpec(axis)
  split = NamedSharding(mesh, spec)
  inputs = [jax.make_array_from_callback(x.shape, split, lambda idx, x=x: x[idx]) for x in stacked]
  run = _compiled(solve, mesh, axis, len(stacked))
  out = run(*inputs)
  # gathered on the host, not on the devices: a device never holds more than its own problems' results
  if jax.process_count() > 1:
    host = multihost_utils.process_allgather(out, tiled=True)
  else:
    host = jax.tree.map(np.asarray, out)
  return {name: jax.tree.map(lambda x, k=k: np.asarray(x[k]), host) for k, name in enumerate(names)}


def _compiled(solve, mesh, axis, nargs):
  spec = PartitionSpec(axis)
  # check_vma=False: solvers with loops carry values built inside the loop (the problems are independent, so
  # nothing in them is a collective whose replication the check would guard)
  mapped = jax.shard_map(jax.vmap(solve), mesh=mesh, in_specs=(spec,) * nargs, out_specs=spec, check_vma=False)
  return jax.jit(mapped)


def _threaded(solve, problems, devices) -> dict[str, Any]:
  """Problems round-robin over `devices` (all processes' devices, in mesh order); this process solves those of
  its own devices, one thread per device; with several processes the results are then exchanged."""
  names = list(problems)
  plan = {dev: names[k::len(devices)] for k, dev in enumerate(devices)}
  local = {dev: mine for dev, mine in plan.items() if dev.process_index == jax.process_index() and mine}

  def work(dev, mine):
    out = {}
    for name in mine:
      args = tuple(jax.device_put(_process_local(a), dev) for a in problems[name])
      out[name] = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), solve(*args))
    return out

  results: dict[str, Any] = {}
  if local:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(local)) as pool:
      for part in pool.map(lambda item: work(*item), local.items()):
        results.update(part)
  if jax.process_count() > 1:
    results = _exchange(results)
  missing = [n for n in names if n not in results]
  if missing:
    raise RuntimeError(f'solve_parallel: no process solved {missing}; every process must pass the same problems.')
  return {n: results[n] for n in names}


def _exchange(mine: dict[str, Any]) -> dict[str, Any]:
  """Every process's {name: result pytree of host arrays} -> their union, on every process.

  Results travel as one byte string per process in `core.serialize`'s format (compressed leaves included),
  padded to a power of two at least the longest and all-gathered.
  """
  payload = np.frombuffer(core.serialize.dumps(mine), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int64))).reshape(-1)
  # padded to a power of two: the all-gather compiles once per length, so lengths repeat across blocks
  padded = np.zeros((1 << int(sizes.max() - 1).bit_length(),), np.uint8)
  padded[:payload.size] = payload
  every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, longest]
  out: dict[str, Any] = {}
  for p, n in enumerate(sizes):
    out.update(core.serialize.loads(every[p, :int(n)].tobytes()))
  return out
