"""Streaming, layer-wise calibration: run the model block by block and fold every linear's input into statistics.

    stats = calibrate(model, params, batches, observers.hessian())
    stats['layers/3/mlp/down_proj/kernel']['xtx']      # [in, in] float32, summed over every real token

Order of work (what keeps memory flat in the number of batches):

    h[b] = embed(batch b)                               for every batch b      (hidden states are kept)
    for block i:                                        block i's params alone go to the device
      for batch b:   h[b], stats_i = step(block_i, h[b], stats_i)              (one jit per block shape)
      [sequential: block_i = compress_block(i, block_i, stats_i); h[b] = block_i(h[b]) for every b]

Inside `step` each linear's input x [B, T, in] is handed to `observer.update` as the block runs
(`Model.block_with_inputs`), so x lives only inside the jitted step: what outlives a batch is the statistics
and the block output [B, T, D]. The raw inputs of the whole calibration set (11.5 GB fp32 for one Llama-7B
down_proj over 128 x 2048 tokens) are never held. `offload=True` keeps the hidden states on the host between
blocks. Parameters may stay on the host (numpy): they move to the device one block at a time.

With `mesh=`, batch rows are split over the mesh's data axis (each process passes its own rows) and the
statistics, being sums or maxima over rows, are all-reduced by the partitioner inside the same jit. That sum
runs in an order set by the device count, so 1 device and 2 processes agree only to float32 rounding (~1e-7),
and layer-wise solvers (SparseGPT, GPTQ) turn those last bits into other masks and codes.

`deterministic=True` makes the statistics and hidden states the same to the bit for 1 device, N devices and P
processes (when every batch's rows divide evenly over the data axis). The all-reduce is not the only source of
difference: XLA's code for a reduction or an exp depends on the shapes (a softmax over 8 rows can round
differently from the same softmax over 2), so the hidden states of 1 device and of 4 differ in the last bits
too. In this mode the embedding, every block and the head run one row at a time, [1, T, D] (a loop over the
rows a device holds, inside a shard_map over the data axis with a mesh): the same program on every device,
whatever its number of rows. Each row's statistics c_r = update(init, x_r, mask_r) are kept apart and merged in
a pairwise tree fixed by B alone, ((c0 + c1) + (c2 + c3)) + ..., then into the running statistics; each merge
is elementwise, so where it runs changes no bit. With a power of two of rows per device, a device's rows are a
whole subtree: it merges them itself and one all-gather brings the data devices' results together (otherwise
every row's statistics are gathered). Costs: rows run one by one (smaller matmuls), and a step holds the
statistics of every kernel of the pass once per row the device holds, then once per data device (per row of
the batch without a power of two), so about (B / data devices + data devices) x their size (a 4096-wide
hessian: 64 MiB per row and kernel; per_group=True holds one group's); the wide in-place hessian update
(`observers.WIDE`) saves nothing. A block that mixes rows (a mixture-of-experts layer whose expert capacity
counts the batch's tokens) sees each row alone.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcompress import core
from jaxcompress.calibration.observers import Observer, Stats
from jaxcompress.models import Model, Params, ids
from jaxcompress.models.layers import Routed

# compress_block(block index, block params on the device (Shared references resolved), {kernel path within
# the block: stats}) -> new block params (may keep Shared references; resolved against params['_shared']).
CompressBlock = Callable[[int, Params, dict[str, Stats]], Params]
# on_step(phase, block, batch): called after every step ('embed', 'stats', 'forward', 'head'; 'dense' for the
# steps of a `DensePass`); block is -1 outside blocks. For progress and memory probes; the driver ignores what
# it returns.
OnStep = Callable[[str, int, int], None]


class Rows(NamedTuple):
  """One calibration batch as the driver keeps it on the device.

  tokens: [B, T] int; attention_mask: [B, T] (1 real, 0 padding) or None; token_types: [B, T] int or None.
  """

  tokens: jax.Array
  attention_mask: jax.Array | None = None
  token_types: jax.Array | None = None


def calibrate(model: Model, params: Params, batches: Iterable[Any], observer: Observer, *,
              mesh: Mesh | None = None, data_axis: str | tuple[str, ...] = 'data', offload: bool = False,
              head: bool = True, deterministic: bool = False, on_step: OnStep | None = None,
              experts: bool = False) -> dict[str, Stats]:
  """{kernel path: statistics} of every linear layer the forward pass runs, streamed batch by batch.

  model, params: the model spec and its parameters (numpy or jax; `Shared` storage resolved per block).
  batches: token arrays [B, T] int, or mappings with 'tokens' (or 'inputs', as `data.pipeline` batches) and
    optionally 'attention_mask' [B, T] (padding rows are excluded from the statistics) and 'token_types'.
    With several processes, each passes its own rows of every batch.
  observer: what to keep of each input (`observers.hessian()`, `column_norms()`, `abs_max()`, `combine(...)`).
  mesh, data_axis: split batch rows over this mesh axis (or axes); statistics come back replicated.
  offload: keep the hidden states between blocks on the host instead of the device.
  head: also observe the head's linears (e.g. lm_head, BERT's MLM transform).
  experts: the caller reads the statistics of mixture-of-experts weights (`models.moe`): each stacked expert
    weight ('layers/{i}/mlp/up' [E, d, f], ...) gets the observer's statistics stacked over experts ([E, ...]),
    each expert's from the tokens routed to it (`layers.Routed`: dropped tokens and empty slots excluded).
    False (default): a model with such weights is refused, so no caller silently leaves them out.
  deterministic: run each row alone and merge the statistics in an order fixed by the batch size, so they are
    identical to the bit for any number of devices and processes (rows must divide evenly over the data
    axis); costs about (rows per device + data devices) x the statistics' size of transient memory and
    one-row matmuls (module docstring).
  Returns statistics in call order, block by block (device arrays; host numpy with offload=True).
  """
  if _RECORDING:
    raise NotSequential('calibrate: the statistics of the whole uncompressed model are asked for, not a block '
                        'by block compression (run_sequential).')
  stats, _ = _run(model, params, batches, observer, None, mesh=mesh, data_axis=data_axis, offload=offload,
                  head=head, keep_stats=True, on_step=on_step, deterministic=deterministic, experts=experts)
  return stats


# Recording a family's block compressor ------------------------------------------------------------------------------


class DensePass(NamedTuple):
  """A first pass over the whole model as a stage receives it, before its first block is compressed: what a
  stage needs whose every block depends on all blocks (OWL's per-layer sparsities, from the dense model's
  outlier ratios). In memory it is one `calibrate`; out of core (`compress_checkpoint`) the same statistics are
  streamed block by block from the checkpoint, the blocks' outputs written to disk as the main loop's are.

  observer: statistics of every block linear's input, block i fed by blocks 0..i-1 as given (`calibrate`'s,
    head excluded). Every block's are held until summarize: keep them small (`column_norms()`, not `hessian()`).
  summarize(stats {kernel path: stats}, weights {path: kernel}) -> a JSON-able summary (e.g. {path: sparsity});
    weights is a mapping read on access (out of core: from the checkpoint, one block's kernels held at a time).
    The stage's compress_block then gets the summary as a fourth argument, as it comes back from JSON (the
    out-of-core manifest keeps it, so a resumed run does not repeat the pass).
  """

  observer: Observer
  summarize: Callable[[dict[str, Stats], Mapping[str, Any]], Any]


class SequentialPlan(NamedTuple):
  """What a layer-wise method hands `run_sequential`: enough to run it block by block elsewhere."""

  observer: Observer  # the statistics its compress_block reads
  compress_block: CompressBlock  # (block index, block params, stats) -> compressed block params
  per_group: bool  # calibrate each input group on the block as compressed so far
  calibrate_on: str = 'compressed'  # block i's inputs: through blocks 0..i-1 compressed, or 'original'
  experts: bool = False  # compress_block handles stacked expert statistics (see run_sequential)
  dense: DensePass | None = None  # a first pass over the whole model; compress_block(i, block, stats, summary)


def as_json(summary: Any, *, caller: str) -> Any:
  """A `DensePass` summary as JSON gives it back (the form every path hands compress_block), or a TypeError."""
  try:
    return json.loads(json.dumps(summary, sort_keys=True, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(f'{caller}: the dense pass summary must be JSON-able (dicts, lists, str, finite numbers): '
                    f'{e}.') from None


def bind_summary(compress_block: Callable[..., Params], summary: Any) -> CompressBlock:
  """compress_block(i, block, stats, summary) as the driver calls it: (i, block, stats) -> block params."""
  return lambda i, block, stats: compress_block(i, block, stats, summary)


class NotSequential(RuntimeError):
  """Raised inside `record_sequential` by `calibrate`: the method needs whole-model statistics."""


_RECORDING: list[list[SequentialPlan]] = []


@contextlib.contextmanager
def record_sequential():
  """Inside, `run_sequential` runs nothing: it appends its `SequentialPlan` (observer, compress_block,
  per_group, calibrate_on) to the yielded list and returns the params unchanged; `calibrate` raises
  `NotSequential`. So a driver that holds one block at a time (`compress_checkpoint`) can run any method built
  on `run_sequential` (Wanda, SparseGPT, GPTQ, AWQ; on the original model's statistics W8A8 / SmoothQuant,
  SqueezeLLM, ASVD, SVD-LLM; with a `DensePass`, Wanda / SparseGPT with distribution='owl') by calling its
  model-level function once with abstract params (paths, shapes)."""
  plans: list[SequentialPlan] = []
  _RECORDING.append(plans)
  try:
    yield plans
  finally:
    _RECORDING.pop()


def run_sequential(model: Model, params: Params, batches: Iterable[Any], observer: Observer,
                   compress_block: CompressBlock, *, mesh: Mesh | None = None,
                   data_axis: str | tuple[str, ...] = 'data', offload: bool = False, keep_stats: bool = True,
                   per_group: bool = False, calibrate_on: str = 'compressed', deterministic: bool = False,
                   on_step: OnStep | None = None, experts: bool = False,
                   dense: DensePass | None = None) -> tuple[Params, dict[str, Stats]]:
  """Sequential (GPTQ / SparseGPT-style) compression: block i is calibrated on the outputs of the already
  compressed blocks 0..i-1, compressed by `compress_block(i, block_params, stats)`, and its outputs are
  recomputed with the compressed weights before block i + 1 sees them.

  calibrate_on='original': block i is calibrated on the outputs of the blocks 0..i-1 as given (the hidden
    states go on through the uncompressed block), so the statistics equal `calibrate`'s on the given model
    (SmoothQuant, SVD-LLM, ASVD), while only one block's statistics are held at a time.

  per_group: "true sequential" within the block too: for each group of `model.block_structure()` in call
    order (q/k/v, then o, then gate/up, then down), calibrate only that group's kernels on the block as
    compressed so far and call compress_block(i, block_params, stats of that group) (one pass over the
    batches per group instead of one per block).
  experts: compress_block handles mixture-of-experts weights: it gets each stacked expert weight's statistics
    stacked over experts (see `calibrate`) and returns the weight compressed expert by expert. False: a model
    whose blocks hold such weights is refused with an error naming them (a method that does not compress
    experts must not leave them float unnoticed).
  dense: a first pass over the model as given (`DensePass`): its statistics of every block (`calibrate`, head
    excluded) and the weights go to dense.summarize before block 0 is compressed, and compress_block is called
    as compress_block(i, block_params, stats, summary).
  Only one block's parameters are on the device at a time (with offload=True the compressed blocks go to the
  host). deterministic=True: statistics identical to the bit for any number of devices and processes, so a
  deterministic compress_block gives the same masks and codes on 1 device, N devices and P processes (see
  `calibrate`). Returns (params with every block replaced by compress_block's result, {kernel path: stats} if
  keep_stats else {}). Other arguments as in `calibrate`.
  """
  if not callable(compress_block):
    raise TypeError(f'run_sequential: compress_block={compress_block!r} must be a function '
                    '(block index, block params, stats) -> block params.')
  if calibrate_on not in ('compressed', 'original'):
    raise ValueError(f"run_sequential: calibrate_on={calibrate_on!r}; choose 'compressed' (block i sees blocks "
                     "0..i-1 compressed) or 'original' (it sees them as given).")
  if per_group and calibrate_on == 'original':
    raise ValueError("run_sequential: per_group=True calibrates on the block as compressed so far; with "
                     "calibrate_on='original' give per_group=False.")
  if dense is not None and not (isinstance(dense, DensePass) and isinstance(dense.observer, Observer)
                                and callable(dense.summarize)):
    raise TypeError(f'run_sequential: dense={dense!r} must be a calibration.DensePass(observer, summarize).')
  if _RECORDING:
    _RECORDING[-1].append(SequentialPlan(observer=observer, compress_block=compress_block, per_group=per_group,
                                         calibrate_on=calibrate_on, experts=experts, dense=dense))
    return params, {}
  if dense is not None:
    batches = list(batches)  # read twice: the dense pass, then the compression
    dense_step = None if on_step is None else (lambda phase, block, batch: on_step('dense', block, batch))
    first = calibrate(model, params, batches, dense.observer, mesh=mesh, data_axis=data_axis, offload=offload,
                      head=False, deterministic=deterministic, on_step=dense_step, experts=experts)
    summary = as_json(dense.summarize(first, core.paths.flatten(params)), caller='run_sequential')
    del first
    compress_block = bind_summary(compress_block, summary)
  stats, params = _run(model, params, batches, observer, compress_block, mesh=mesh, data_axis=data_axis,
                       offload=offload, head=False, keep_stats=keep_stats, on_step=on_step, per_group=per_group,
                       original=calibrate_on == 'original', deterministic=deterministic, experts=experts)
  return params, stats


class BlockData(NamedTuple):
  """What `run_blockwise` shows a block: one entry per calibration batch.

  inputs: the hidden states [B, T, D] entering the block in the model as compressed so far; targets: the
  block's output in the uncompressed model (the uncompressed block on the uncompressed model's hidden states);
  rows: the batches' `Rows` (tokens and padding, for `model.context`). With offload=True the hidden states are
  host arrays.
  """

  inputs: list[Any]
  targets: list[Any]
  rows: list[Rows]

  def weights(self, j: int) -> jax.Array:
    """[B * T] float32 of batch j: 1 for a real token, 0 for padding."""
    return _token_weights(self.rows[j])


# fit_block(block index, block params on the device, BlockData) -> new block params
FitBlock = Callable[[int, Params, BlockData], Params]


def run_blockwise(model: Model, params: Params, batches: Iterable[Any], fit_block: FitBlock, *,
                  offload: bool = False, on_step: OnStep | None = None) -> Params:
  """Block-wise reconstruction (OmniQuant, BRECQ-style): block i is fitted by `fit_block(i, block, data)` to
  reproduce the uncompressed model's output of block i (data.targets) from the hidden states of the model
  compressed up to block i - 1 (data.inputs); both streams then go on, the uncompressed one through the
  uncompressed block and the other through the fitted one.

  Two streams of hidden states are held (2 x batches x [B, T, D]; offload=True keeps them on the host), and one
  block's parameters on the device at a time. on_step(phase, block, batch): 'embed', 'target', 'forward'.
  One device (no mesh). Returns params with every block replaced by fit_block's result.
  """
  if not callable(fit_block):
    raise TypeError(f'run_blockwise: fit_block={fit_block!r} must be a function (block index, block params, '
                    'BlockData) -> block params.')
  if _RECORDING:
    raise NotSequential('run_blockwise: a block-wise reconstruction fits each block on its hidden states, '
                        'not from linear statistics (run_sequential).')
  place = _Placement(None, 'data', offload)
  on_step = on_step or (lambda phase, block, batch: None)
  rows, inputs = _embedded(model, params, batches, place, False, on_step, caller='run_blockwise')
  targets = list(inputs)
  forward = lambda block, h, r: _block_step(model, None, block, place.fetch(h), r, None, shardings=None,
                                            outputs=True)[0]
  new_blocks = {}
  for i in range(model.num_layers(params)):
    block = place.replicated(model.block_params(params, i))
    for j, r in enumerate(rows):
      targets[j] = place.keep(forward(block, targets[j], r))
      on_step('target', i, j)
    new = fit_block(i, block, BlockData(list(inputs), list(targets), rows))
    del block
    block = place.replicated(model.block_params(_with_block(model, params, i, new), i))
    for j, r in enumerate(rows):
      inputs[j] = place.keep(forward(block, inputs[j], r))
      on_step('forward', i, j)
    new_blocks[i] = _to_host(new) if offload else new
    del block, new
  return _with_blocks(model, params, new_blocks)


# The loop -------------------------------------------------------------------------------------------------------


def _run(model, params, batches, observer, compress_block, *, mesh, data_axis, offload, head, keep_stats, on_step,
         per_group=False, original=False, deterministic=False, experts=False):
  if not isinstance(observer, Observer):
    raise TypeError(f'observer={observer!r} is not an Observer; use e.g. calibration.hessian().')
  if mesh is not None and any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
    raise ValueError(f'calibrate: mesh axis types {mesh.axis_types} must all be AxisType.Auto (the driver '
                     'places arrays with NamedShardings); build it with jax.make_mesh(..., '
                     'axis_types=(jax.sharding.AxisType.Auto,) * n).')
  place = _Placement(mesh, data_axis, offload)
  on_step = on_step or (lambda phase, block, batch: None)
  shardings = place.shardings()
  rows, hs = _embedded(model, params, batches, place, deterministic, on_step, caller='calibrate')

  out_stats: dict[str, Stats] = {}
  new_blocks = {}
  for i in range(model.num_layers(params)):
    block = place.replicated(model.block_params(params, i))
    shapes = dict(_linear_shapes(model, block, place.fetch(hs[0]), rows[0], experts=experts, block_index=i))
    # the kernels calibrated together: the whole block, or (per_group) each group of shared inputs in turn
    passes = [tuple(shapes)] if not per_group else _group_passes(model, params, i, shapes)
    for kernels in passes:
      stats = {p: place.replicated(_init_stats(observer, p, shapes[p])) for p in kernels}
      for j, r in enumerate(rows):
        out, stats = _block_step(model, observer, block, place.fetch(hs[j]), r, stats, shardings=shardings,
                                 outputs=compress_block is None, deterministic=deterministic)
        if compress_block is None:
          hs[j] = place.keep(out)
        out = None  # the device copy of an offloaded output goes now, not at the next step
        on_step('stats', i, j)
      stats = {p: stats[p] for p in kernels}  # call order again (jit returns dicts sorted by key)
      if keep_stats:
        out_stats.update({f'{model.block_path}/{i}/{p}': place.keep_stats(x) for p, x in stats.items()})
      if compress_block is not None:
        # the statistics' program (collectives across the mesh) ends before compress_block dispatches its own:
        # on a host with fewer cores than virtual devices, overlapping them stalled XLA's collective rendezvous
        new = compress_block(i, block, jax.block_until_ready(stats))
        del stats
        new_blocks[i] = new
        if not original:  # the hidden states go on through the compressed block, which replaces the old one
          del block
          block = place.replicated(model.block_params(_with_block(model, params, i, new), i))
        del new
      stats = None
    if compress_block is not None:
      if offload:
        new_blocks[i] = _to_host(new_blocks[i])
      for j, r in enumerate(rows):
        hs[j] = place.keep(_block_step(model, None, block, place.fetch(hs[j]), r, None, shardings=shardings,
                                       outputs=True)[0])
        on_step('forward', i, j)
    del block

  if head:
    rest, abstract = _outside_blocks(model, params)
    rest_dev = place.replicated(rest)
    names = _head_shapes(model, rest, abstract, place.fetch(hs[0]))
    stats = {p: place.replicated(observer.init(p, n)) for p, n in names}
    head_step = jax.jit(functools.partial(_head_step, model, observer, abstract, shardings, deterministic),
                        donate_argnums=(3,))
    for j, r in enumerate(rows):
      stats = head_step(rest_dev, place.fetch(hs[j]), r, stats)
      on_step('head', -1, j)
    out_stats.update({p: place.keep_stats(stats[p]) for p, _ in names})

  if compress_block is None:
    return out_stats, params
  return out_stats, _with_blocks(model, params, new_blocks)


def _embedded(model, params, batches, place, deterministic, on_step, *, caller):
  """(every batch's Rows, its embedded hidden states as kept between blocks); an empty `batches` is an error."""
  rows = [place.rows(_as_rows(b, j, model)) for j, b in enumerate(batches)]
  if not rows:
    raise ValueError(f'{caller}: batches is empty; give at least one batch of tokens [B, T].')
  rest, abstract = _outside_blocks(model, params)
  embed = _embed_step(model, abstract, place.shardings(), deterministic)
  rest_dev = place.replicated(rest)
  hs = []
  for j, r in enumerate(rows):
    hs.append(place.keep(embed(rest_dev, r)))
    on_step('embed', -1, j)
  return rows, hs  # the device copy of the embedding table goes with rest_dev: blocks run without it


@functools.partial(jax.jit, static_argnames=('model', 'observer', 'shardings', 'outputs', 'deterministic'),
                   donate_argnames=('stats',))
def _block_step(model: Model, observer: Observer | None, block: Params, h: jax.Array, rows: Rows, stats,
                *, shardings, outputs: bool, deterministic: bool = False):
  """One block on one batch: (output [B, T, D] or None, stats with this batch's linear inputs folded in).

  observer None: the plain forward (sequential mode's recomputation). Compiled once per block shape.
  deterministic: one row at a time, statistics folded in a device-count-free order (`_by_rows`).
  """
  if deterministic:
    return _block_step_by_rows(model, observer, block, h, rows, stats, shardings, outputs)
  ctx = model.context(rows.tokens, attention_mask=rows.attention_mask)
  if observer is None:
    return _constrain_rows(model.block(block, h, ctx), shardings), None
  weights = _token_weights(rows)
  stats = dict(stats)

  def observe(path, x):
    if path not in stats:  # per-group passes calibrate some kernels only
      return
    stats[path] = _update(observer, stats[path], x, weights)

  out = model.block_with_inputs(block, h, ctx, observe)
  return (_constrain_rows(out, shardings) if outputs else None), _constrain_stats(stats, shardings)


def _head_step(model, observer, abstract, shardings, deterministic, rest, h, rows, stats):
  if deterministic:
    def row(rest, h, r):
      return None, _row_stats(observer, set(stats), _token_weights(r),
                              lambda observe: model.head_with_inputs(_fill(rest, abstract), h, observe))

    _, batch = _by_rows(row, shardings, rest, h, rows, observer)
    return _constrain_stats(_merge_into(observer, stats, batch), shardings)
  weights = _token_weights(rows)
  stats = dict(stats)

  def observe(path, x):
    stats[path] = observer.update(stats[path], x.reshape(-1, x.shape[-1]), weights)

  model.head_with_inputs(_fill(rest, abstract), h, observe)  # logits unused: XLA drops the head's last matmul
  return _constrain_stats(stats, shardings)


# Deterministic mode: every row alone, statistics merged in an order fixed by the batch size -------------------


def _block_step_by_rows(model, observer, block, h, rows, stats, shardings, outputs):
  """`_block_step` with deterministic=True.

  XLA's code for an op depends on its shapes (a reduction or an exp over 8 rows can round differently from the
  same op over 2), so the block runs one row at a time, [1, T, D], as the same program on every device; each
  row's statistics are kept apart and merged in a fixed order (`_by_rows`).
  """
  kernels = set(stats) if observer is not None else set()

  def row(block, h, r):
    ctx = model.context(r.tokens, attention_mask=r.attention_mask)
    out = []
    per_row = _row_stats(observer, kernels, _token_weights(r),
                         lambda observe: out.append(model.block_with_inputs(block, h, ctx, observe)))
    return out[0], per_row

  out, batch = _by_rows(row, shardings, block, h, rows, observer)
  out = _constrain_rows(out, shardings) if outputs else None
  if observer is None:
    return out, None
  return out, _constrain_stats(_merge_into(observer, stats, batch), shardings)


def _update(observer: Observer, stats: Stats, x, weights: jax.Array) -> Stats:
  """observer.update with a linear's input x [..., in] and the token weights [tokens]; a stacked expert
  weight's input (`Routed`) updates each expert's statistics from the tokens routed to it."""
  if isinstance(x, Routed):
    mask = jnp.where(x.keep, weights if x.token is None else weights[x.token], 0.0)  # [E, C]
    return jax.vmap(observer.update)(stats, x.x, mask)
  return observer.update(stats, x.reshape(-1, x.shape[-1]), weights)


def _input_shape(x) -> int | tuple[int, int]:
  """in_features of a linear's input, or (experts, in_features) of a stacked expert weight's."""
  return (x.x.shape[0], x.x.shape[-1]) if isinstance(x, Routed) else x.shape[-1]


def _row_stats(observer, kernels, weights, run) -> dict[str, Stats]:
  """{path: statistics of this row alone} of the kernels named, from run(observe); weights [T] (1 real token)."""
  out = {}

  def observe(path, x):
    if path not in kernels:
      return
    start = out[path] if path in out else _init_stats(observer, path, _input_shape(x))
    out[path] = _update(observer, start, x, weights)

  run(observe)
  return out


def _merge_into(observer: Observer, stats: dict[str, Stats], batch: dict[str, Stats]) -> dict[str, Stats]:
  return {**stats, **{p: observer.merge(stats[p], b) for p, b in batch.items()}}


def _by_rows(row, shardings, consts, h, rows, observer):
  """row(consts, h [1, T, D], rows [1, T]) -> (out [1, ...] or None, {path: stats}) run for each row of
  h [B, ...]: (outs [B, ...], {path: the batch's stats}, replicated), the rows' statistics merged by
  `_fold_rows`.

  A loop over the rows each device holds (in a shard_map over the data axis with a mesh), so every device runs
  the one-row program, whatever its number of rows. With a power of two of rows per device, each device first
  merges its own rows (the tree's first levels), and one all-gather brings the per-device results together;
  else every row's statistics are gathered. Either way the merges are those of `_fold_rows` over the B rows.
  """
  merge = (lambda a, b: {p: observer.merge(a[p], b[p]) for p in a}) if observer is not None else None
  split = shardings[0].spec if shardings is not None else None

  def local(consts, h, rows):
    def one(row_args):
      out, stats = row(consts, *row_args)
      return (None if out is None else out[0]), stats

    n = h.shape[0]
    take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1), (h, rows))
    put = lambda ys, y, i: jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, i, 0), ys, y)
    done = jax.eval_shape(one, take(0))
    ys = jax.tree.map(lambda s: jnp.zeros((n, *s.shape), s.dtype), done)

    # The row's program reads its input from the loop state and leaves its result there, written out one
    # iteration later: fused with the slicing or the writing out (which XLA simplifies away for a single row)
    # its first and last ops could round differently for 1 row than for 8 (a layer norm's reduction).
    def step(i, state):
      ys, cur, last = state
      ys = put(ys, last, jnp.maximum(i - 1, 0))  # row i - 1's result (i = 0: zeros, overwritten next)
      return ys, take(jnp.minimum(i + 1, n - 1)), one(cur)

    last = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), done)
    # A trip count XLA cannot see, or it would inline a loop of one row into the step.
    stop = jax.lax.optimization_barrier(jnp.int32(n))
    ys, _, last = jax.lax.fori_loop(0, stop, step, (ys, take(0), last))
    outs, per_row = put(ys, last, n - 1)
    if merge is None:
      return outs, {}
    if shardings is None:
      return outs, _fold_rows(merge, per_row)
    if n & (n - 1) == 0:  # a power of two: device d's rows are a whole subtree of the B rows' tree
      per_row = _fold_rows(merge, per_row)
      per_row = jax.tree.map(lambda x: x[None], per_row)
    gathered = jax.lax.all_gather(per_row, split[0], tiled=True)
    return outs, _fold_rows(merge, gathered)

  if shardings is None:
    return local(consts, h, rows)
  return jax.shard_map(local, mesh=shardings[0].mesh, in_specs=(PartitionSpec(), split, split),
                       out_specs=(split, PartitionSpec()), check_vma=False)(consts, h, rows)


def _fold_rows(merge, per_row):
  """The merge of per_row's rows (leaves [n, ...]) in an order that only n decides: rows 2k and 2k + 1 merged,
  level by level (an odd last row goes up unmerged) until one is left. Each merge is elementwise."""
  n = jax.tree.leaves(per_row)[0].shape[0] if jax.tree.leaves(per_row) else 1
  while n > 1:
    half = n // 2
    pairs = jax.tree.map(lambda x: x[:2 * half].reshape(half, 2, *x.shape[1:]), per_row)
    merged = jax.vmap(merge)(jax.tree.map(lambda x: x[:, 0], pairs), jax.tree.map(lambda x: x[:, 1], pairs))
    if n % 2:
      merged = jax.tree.map(lambda m, x: jnp.concatenate([m, x[-1:]]), merged, per_row)
    per_row, n = merged, half + n % 2
  return jax.tree.map(lambda x: x[0], per_row)


def _embed_step(model: Model, abstract: Params, shardings, deterministic: bool):
  """jit (params outside the blocks, Rows) -> hidden states [B, T, D] (`_outside_blocks` for `abstract`)."""
  embed_rows = lambda rest, r: model.embed(_fill(rest, abstract), r.tokens, token_types=r.token_types)
  if deterministic:  # one row at a time, as the blocks (`_by_rows`)
    embed_rows = functools.partial(_embed_by_rows, embed_rows, shardings)
  return jax.jit(lambda rest, r: _constrain_rows(embed_rows(rest, r), shardings))


def _embed_by_rows(embed, shardings, rest, rows):
  empty = jnp.zeros(rows.tokens.shape + (0,), jnp.float32)  # no hidden states yet: an empty stand-in for h
  return _by_rows(lambda rest, h, r: (embed(rest, r), {}), shardings, rest, empty, rows, None)[0]


def _token_weights(rows: Rows) -> jax.Array:
  """[B * T] float32: 1 for real tokens, 0 for padding."""
  if rows.attention_mask is None:
    return jnp.ones((rows.tokens.size,), jnp.float32)
  return (rows.attention_mask.reshape(-1) > 0).astype(jnp.float32)


def _linear_shapes(model, block, h, rows, *, experts: bool, block_index: int
                   ) -> list[tuple[str, int | tuple[int, int]]]:
  """(kernel path within the block, in_features) of every linear the block runs, in call order; a stacked
  expert weight gives (its path, (experts, in_features)). Without `experts`, such weights are an error."""
  seen = []

  def trace(block, h, rows):
    ctx = model.context(rows.tokens, attention_mask=rows.attention_mask)
    return model.block_with_inputs(block, h, ctx, lambda path, x: seen.append((path, _input_shape(x))))

  jax.eval_shape(trace, block, h, rows)
  found = _unique(seen)
  routed = [p for p, n in found if isinstance(n, tuple)]
  if routed and not experts:
    raise ValueError(
        f'calibration: block {block_index} holds mixture-of-experts weights {routed} (stacked [experts, in, out], '
        'each expert fed only the tokens routed to it), which this method does not calibrate, and it would leave '
        'them uncompressed. Use a method that compresses experts one by one (quantization.gptq, pruning.sparsegpt, '
        'pruning.wanda), or compress the dense model before architecture.moefy_model; a direct calibrate() call '
        'takes experts=True for statistics stacked over experts.')
  return found


def _init_stats(observer: Observer, path: str, shape: int | tuple[int, int]) -> Stats:
  """observer.init(path, in_features), or for a stacked expert weight (shape (E, in_features)) E copies of it
  stacked on a leading axis."""
  if not isinstance(shape, tuple):
    return observer.init(path, shape)
  e, n = shape
  return jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a)[None], e, axis=0), observer.init(path, n))


def _group_passes(model: Model, params: Params, i: int, shapes: dict[str, int]) -> list[tuple[str, ...]]:
  groups = [g.kernels for g in model.block_structure(params[model.block_path][i])]
  grouped = {k for g in groups for k in g}
  if set(shapes) != grouped:
    raise ValueError(f'per_group: block {i} runs linears {sorted(set(shapes) - grouped)} that no group of '
                     f'{type(model).__name__}.block_structure() names, or the groups name '
                     f"{sorted(grouped - set(shapes))} that the block does not run; fix the family's linear_groups.")
  return groups


def _head_shapes(model, rest, abstract, h) -> list[tuple[str, int]]:
  seen = []
  jax.eval_shape(lambda rest, h: model.head_with_inputs(_fill(rest, abstract), h,
                                                        lambda path, x: seen.append((path, x.shape[-1]))), rest, h)
  return _unique(seen)


def _unique(pairs):
  out = {}
  for path, n in pairs:
    out.setdefault(path, n)
  return list(out.items())


# Parameters outside the blocks --------------------------------------------------------------------------------


def _outside_blocks(model: Model, params: Params) -> tuple[Params, Params]:
  """(params the embedding and head read, shapes of the rest: blocks and storage only blocks use).

  `Model.embed` and `head` bind the whole tree; `_fill` rebuilds the missing part as zeros inside the jit,
  which XLA drops because nothing reads it, so block weights never reach the device here.
  """
  store = params.get(core.SHARED, {})
  outside = {k: v for k, v in params.items() if k not in (model.block_path, core.SHARED)}
  used = {x.name for x in jax.tree.leaves(outside, is_leaf=core.is_weight_leaf) if isinstance(x, core.Shared)}
  rest = dict(outside)
  if store:
    rest[core.SHARED] = {n: v for n, v in store.items() if n in used}
  shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  abstract = {model.block_path: jax.tree.map(shape, params[model.block_path]),
              core.SHARED: jax.tree.map(shape, {n: v for n, v in store.items() if n not in used})}
  return rest, abstract


def _fill(rest: Params, abstract: Params) -> Params:
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  full = {k: v for k, v in rest.items() if k != core.SHARED}
  full.update({k: zeros(v) for k, v in abstract.items() if k != core.SHARED})
  shared = {**rest.get(core.SHARED, {}), **zeros(abstract[core.SHARED])}
  if shared:
    full[core.SHARED] = shared
  return full


def _with_block(model: Model, params: Params, i: int, block: Params) -> Params:
  return {**params, model.block_path: {i: block}}


def _with_blocks(model: Model, params: Params, new: dict[int, Params]) -> Params:
  blocks = params[model.block_path]
  if isinstance(blocks, dict):
    blocks = {**blocks, **new}
  else:
    blocks = type(blocks)(new.get(i, b) for i, b in enumerate(blocks))
  return {**params, model.block_path: blocks}


# Placement ----------------------------------------------------------------------------------------------------


class _Placement(NamedTuple):
  """Where the driver's arrays live: one device, or a mesh whose data axis splits batch rows."""

  mesh: Mesh | None
  data_axis: str | tuple[str, ...]
  offload: bool

  def shardings(self) -> tuple[NamedSharding, NamedSharding] | None:
    """(batch rows over the data axis, replicated), or None without a mesh."""
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, PartitionSpec(self.data_axis)), NamedSharding(self.mesh, PartitionSpec())

  def rows(self, r: Rows) -> Rows:
    """Host or device rows -> device arrays (with a mesh: this process's rows of a global array)."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, r)
    sharding = self.shardings()[0]
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), r)

  def replicated(self, tree):
    if self.mesh is None:
      return jax.device_put(tree)
    return jax.device_put(tree, self.shardings()[1])

  def keep(self, h: jax.Array):
    """A block output as kept between blocks: on the device, or this process's rows on the host."""
    if not self.offload:
      return h
    if self.mesh is None:
      return _to_host(h)
    spec = PartitionSpec(self.data_axis)
    return _to_host(multihost_utils.global_array_to_host_local_array(h, self.mesh, spec))

  def fetch(self, h) -> jax.Array:
    if not self.offload:
      return h
    if self.mesh is None:
      return jnp.asarray(h)
    return jax.make_array_from_process_local_data(self.shardings()[0], h)

  def keep_stats(self, stats):
    return _to_host(stats) if self.offload else stats


def _to_host(tree):
  # A copy: on CPU np.asarray would alias the device buffer and keep it alive.
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _constrain_rows(h: jax.Array, shardings) -> jax.Array:
  return h if shardings is None else jax.lax.with_sharding_constraint(h, shardings[0])


def _constrain_stats(stats, shardings):
  return stats if shardings is None else jax.lax.with_sharding_constraint(stats, shardings[1])


def _as_rows(batch: Any, index: int, model: Model | None = None) -> Rows:
  """One calibration batch as Rows; with `model`, its token ids and token types are checked against the model's
  tables on the host (inside the jitted steps an invalid id embeds as NaN, and the statistics would hold NaN)."""
  if isinstance(batch, Rows):
    r = batch
  elif isinstance(batch, Mapping):
    key = 'tokens' if 'tokens' in batch else 'inputs' if 'inputs' in batch else None
    if key is None:
      raise ValueError(f"calibration batch {index} has keys {sorted(batch)}; it needs 'tokens' (or 'inputs') "
                       "[B, T] int, optionally 'attention_mask' and 'token_types'.")
    r = Rows(batch[key], batch.get('attention_mask'), batch.get('token_types'))
  elif hasattr(batch, 'shape') and hasattr(batch, 'dtype'):
    r = Rows(batch)
  else:
    raise TypeError(f'calibration batch {index} is a {type(batch).__name__}; give a token array [B, T] or a '
                    "mapping with 'tokens' and optionally 'attention_mask'.")
  tokens = r.tokens
  if getattr(tokens, 'ndim', None) != 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f'calibration batch {index}: tokens must be an integer array [B, T], got '
                     f'{getattr(tokens, "dtype", "?")} {tuple(getattr(tokens, "shape", ()))}.')
  for name in ('attention_mask', 'token_types'):
    x = getattr(r, name)
    if x is not None and tuple(np.shape(x)) != tuple(tokens.shape):
      raise ValueError(f'calibration batch {index}: {name} has shape {tuple(np.shape(x))}, tokens '
                       f'{tuple(tokens.shape)}; they must match.')
  if model is not None:
    ids.check_tokens(model, tokens, token_types=r.token_types, where=f'calibration batch {index}: ')
  return r
