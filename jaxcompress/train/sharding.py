"""Device meshes and sharding rules from parameter paths: the same program on 1 CPU, 8 devices or a pod.

Mesh axes: 'data' (batch only), 'fsdp' (batch, and parameters and optimizer state split across it),
'tensor' (matmul dimensions split across it). Batches are split over ('data', 'fsdp').

A rule maps a path regex to the axes of each dimension of a weight, e.g. q_proj kernels [in, out] ->
('fsdp', 'tensor'). The model declares its rules (`model.sharding_rules()`, which `loop.fit` uses); a tree
without a model falls back to `DEFAULT_RULES` (kernels and embeddings split over 'fsdp' only). Inside
compressed leaves each array takes the weight's axes on dimensions the mesh divides, and is replicated
elsewhere (a channel mask [1, out] keeps 'tensor' on out); any leaf kind works, since its arrays are found by
walking the leaf as a pytree. Shared storage (`_shared/<name>`) takes the axes of the first place that uses it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcompress import core
from jaxcompress.models import base as models_base

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

Rule = models_base.ShardingRule
# For trees without a model: model-agnostic (fsdp-only) rules. Models declare their own `sharding_rules()`.
DEFAULT_RULES: tuple[Rule, ...] = models_base.FSDP_RULES


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all devices (of every process); one size may be -1 (fill)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: use positive sizes and at most one -1.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh: {len(devices)} devices do not divide by {known} (the fixed axis sizes).')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, '
                     f'but there are {len(devices)}; make the product equal the device count.')
  auto = (jax.sharding.AxisType.Auto,) * len(AXES)  # shardings propagate from the rules; no explicit-axis typing
  return jax.make_mesh(tuple(sizes), AXES, axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def weight_axes(path: str, ndim: int, rules: Sequence[Rule] = DEFAULT_RULES) -> tuple[str | None, ...]:
  """The first matching rule's axes for a weight (padded/truncated to ndim); replicated if none matches."""
  for pattern, axes in rules:
    if re.search(pattern, path):
      axes = tuple(axes)[:ndim]
      return axes + (None,) * (ndim - len(axes))
  return (None,) * ndim


def array_spec(axes: Sequence[str | None], weight_shape: Sequence[int], shape: Sequence[int], mesh: Mesh) -> P:
  """Spec for one array of a weight: the weight's axes where the dimension divides evenly, else replicated."""
  if len(shape) != len(weight_shape):
    return P()
  spec = []
  for axis, n in zip(axes, shape):
    size = mesh.shape[axis] if axis is not None else 1
    spec.append(axis if axis is not None and size > 1 and n % size == 0 else None)
  return P(*spec)


def param_specs(params: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> dict[str, P]:
  """{array path: PartitionSpec} for every array in params (arrays or ShapeDtypeStructs).

  A shared storage `_shared/<name>` is placed like the first place that references it (its path decides the
  axes), so a tied weight is split the way its users' matmuls expect.
  """
  flat = core.flatten(params)
  users: dict[str, str] = {}  # storage name -> first path that references it
  for wpath, w in flat.items():
    if isinstance(w, core.Shared):
      users.setdefault(w.name, wpath)
  storage_prefix = core.SHARED + core.paths.SEP
  specs = {}
  for wpath, w in flat.items():
    wshape = core.shape_of(w)
    rule_path = wpath
    if wpath.startswith(storage_prefix):
      rule_path = users.get(wpath[len(storage_prefix):], wpath)
    axes = weight_axes(rule_path, len(wshape), rules)
    for kp, arr in jax.tree_util.tree_flatten_with_path(w)[0]:
      sub = core.paths.path_str(kp)
      specs[f'{wpath}/{sub}' if sub else wpath] = array_spec(axes, wshape, arr.shape, mesh)
  return specs


def tree_shardings(tree: Any, specs: dict[str, P], mesh: Mesh) -> Any:
  """NamedShardings for every array of `tree`. An array whose path ends with a known parameter path
  (optimizer moments: "0/mu/layers/0/attn/q_proj/kernel", a transform's masks or per-channel scales) takes
  that parameter's spec on the dimensions the mesh divides, and is replicated on the others."""
  def find(path: str, shape) -> P:
    parts = path.split('/')
    for i in range(len(parts)):
      spec = specs.get('/'.join(parts[i:]))
      if spec is not None and len(spec) <= len(shape):
        return P(*(axis if axis is None or n % _axis_size(mesh, axis) == 0 else None
                   for axis, n in zip(spec, shape)))
    return P()
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: NamedSharding(mesh, find(core.paths.path_str(kp), np.shape(x))), tree)


def _axis_size(mesh: Mesh, axis: str | tuple[str, ...]) -> int:
  return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[Rule] = DEFAULT_RULES) -> Any:
  """Shardings for a whole TrainState (params, optimizer and transform state, counters, rng, frozen teacher)."""
  specs = param_specs(abstract_state.params, mesh, rules)
  if abstract_state.frozen is not None:
    specs.update({f'frozen/{k}': v for k, v in param_specs(abstract_state.frozen, mesh, rules).items()})
  return tree_shardings(abstract_state, specs, mesh)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over ('data', 'fsdp'). Single-process: the whole batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def platform_provides_processes() -> bool:
  """True under a multi-task SLURM job or on a multi-host Cloud TPU slice, where jax finds its peers itself."""
  import os
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu = len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
  return slurm or tpu


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, cpu_collectives: str | None = None) -> None:
  """jax.distributed.initialize from explicit values, or from the platform (TPU pods, SLURM) when none given.

  cpu_collectives='gloo' lets several CPU processes form one job (how multi-host is tested without a pod).
  """
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  if coordinator is None and num_processes is None and process_id is None:
    jax.distributed.initialize()  # TPU pods and SLURM: the platform says who the peers are
  else:
    if None in (coordinator, num_processes, process_id):
      raise ValueError('initialize_distributed: give coordinator, num_processes and process_id together, '
                       'or none of them to let the platform provide them.')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
