"""Out-of-core, resumable sequential compression of a checkpoint larger than host memory.

    manifest = compress_checkpoint('llama-3b/', 'llama-3b-sparse/', compress_block, batches,
                                   observer=calibration.hessian(), recipe={'sparsegpt': 0.5}, seed=0)
    params = load_compressed('llama-3b-sparse/')

The model is never whole in host memory. For block i (as `run_sequential`, true-sequential with per_group):

    read block i's tensors from the input safetensors (positioned reads, `models.streaming`)
    calibrate it on the hidden states h_i (a .npy file on disk, read one batch at a time)
    new_i = compress_block(i, block_i, stats)
    write new_i to output_dir/block_00000i.jc.safetensors (core.serialize; tmp + fsync + rename)
    h_{i+1} = new_i(h_i) with new_i as read back from that file, written to disk the same way
    the manifest records block i's sha256 and h_{i+1}'s (written atomically last)

Peak host memory is about one block (input and compressed) plus its statistics plus one batch of hidden
states. Everything outside the blocks (embedding, final norm, head) is copied unchanged to `rest_<part>.jc.safetensors`.

A first stage whose every block depends on the whole dense model (a `DensePass`: Wanda / SparseGPT with
distribution='owl' or a callable reading `stats`) gets a first pass before block 0 is compressed: the blocks as
read, one at a time, the dense hidden states streamed through d_XXXXX.npy files as above, each step computing a
block's statistics and outputs together as `calibrate` does (so the bits equal the in-memory pass); only the
small statistics (column norms) are kept, then `summarize` reads each block's kernels once more. Its JSON
summary (OWL: the per-layer sparsities) goes into the manifest, so a resumed run does not repeat the pass; an
interrupted pass starts over. The peak stays that of the main loop: one block and one batch, plus the column
norms of every kernel (Σ in_features floats).

Resuming: the same call on the same output directory verifies every recorded block file against its hash,
keeps the verified prefix, takes h from its file (or re-derives it from the embedding through the stored
blocks when that file is missing or does not match) and goes on; the result is bit-identical to an
uninterrupted run, because the forward pass always runs the blocks as read back from disk; hidden-state files
left by the interrupted run other than those the resumed run starts from are removed. A directory holding
another run (a different input checkpoint, recipe, seed, observer or calibration data: the fingerprint in
manifest.json) is refused. A write that fails (disk full) leaves only a temporary file, which the next run
removes: a block is complete only once the manifest says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np


from jaxcompress import core
from jaxcompress.calibration import driver
from jaxcompress.calibration.driver import CompressBlock, Rows
from jaxcompress.calibration.observers import Observer
from jaxcompress.models import streaming

MANIFEST = 'manifest.json'
REST = 'rest_{}.jc.safetensors'  # one file per top-level part outside the blocks
FORMAT = 'jaxcompress-blocks/2'
TMP_PREFIX = '.tmp-'
# on_block(block index, record): called after each block is written (record: file, sha256, bytes, seconds).
OnBlock = Callable[[int, dict], None]


def block_file(i: int) -> str:
  return f'block_{i:05d}.jc.safetensors'


def compress_checkpoint(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                        compress_block: CompressBlock | driver.SequentialPlan | Sequence[driver.SequentialPlan],
                        batches: Iterable[Any], *, observer: Observer | None = None, recipe: Mapping[str, Any],
                        seed: int = 0, per_group: bool = False, dtype: Any = None,
                        mesh: jax.sharding.Mesh | None = None, data_axis: str | tuple[str, ...] = 'data',
                        layers: int | None = None, deterministic: bool = False, on_block: OnBlock | None = None,
                        on_step: driver.OnStep | None = None) -> dict[str, Any]:
  """Compresses the HF checkpoint in `input_dir` block by block into `output_dir`; returns the manifest.

  compress_block(i, block params (device), {kernel path in block: stats}) -> compressed block params (any
    registered leaf kinds), as `run_sequential` calls it. It may pop entries of the stats dict: nothing else
    holds them, so a popped [in, in] XᵀX is freed before the solves that follow.
    Or a sequence of `SequentialPlan`s (what `record_sequential` captures from model-level methods): the stages
    of a recipe, applied to each block in order, each with its own observer, per_group and calibrate_on
    (observer= and per_group= are then not given). Stage k calibrates block i on the hidden states of blocks
    0..i-1 with stages 1..k applied (calibrate_on='compressed') or 1..k-1 ('original'), and on block i with
    stages 1..k-1 applied: exactly what running the stages one after another on the whole model gives. Each
    distinct stream of hidden states is a file on disk; a block with only some of the stages applied stays in
    memory until its stream's forward pass. The first plan may carry a `DensePass` (module docstring); a later
    one is refused (its pass would need the whole model as the stages before it leave it).
  batches: calibration batches as `calibrate` takes them; all must have the same shape (checked first).
  observer: the statistics compress_block reads (e.g. `hessian()`).
  recipe: a JSON-able description of what compress_block does (its configs); part of the fingerprint, so a
    changed recipe is refused instead of mixed with blocks of the old one.
  seed: the seed behind compress_block's randomness, if any (fingerprint too).
  per_group: calibrate each input group of the block on the block as compressed so far (`run_sequential`).
  dtype: cast floating parameters to this dtype on read (default: the checkpoint's).
  mesh, data_axis: split batch rows over the mesh's data axis (`calibrate(mesh=)`); hidden states on disk
    hold this process's rows; process 0 writes the output files.
  layers: stop after this many blocks (a partial run, e.g. for timing); the same call without it goes on.
  deterministic: statistics identical to the bit for any number of devices and processes (`calibrate`), so
    the blocks written are too; part of the fingerprint.
  Output: output_dir/{manifest.json, config.json, rest_<part>.jc.safetensors, block_XXXXX.jc.safetensors,
  h_XXXXX_sM[_pP].npy, d_XXXXX[_pP].npy during a dense pass}; `load_compressed(output_dir)` rebuilds the params.
  """
  plans = _as_plans(compress_block, observer, per_group)
  out = Path(output_dir)
  _lean_host_memory()
  place = driver._Placement(mesh, data_axis, offload=True)
  pid = jax.process_index()
  writer = pid == 0
  # stream m: hidden states through blocks with stages 1..m applied; stage k (1-based) reads stream needs[k-1]
  n_stages = len(plans)
  needs = [k + 1 if p.calibrate_on == 'compressed' else k for k, p in enumerate(plans)]
  streams = sorted(set(needs))
  with streaming.CheckpointStream(input_dir, dtype=dtype) as ckpt:
    model = ckpt.model
    rows = _check_batches(batches, model)
    n_layers = model.config.num_layers
    prefix = f'{model.block_path}/'
    read_block = lambda i: ckpt.read(lambda p: p.startswith(f'{prefix}{i}/'))[model.block_path][i]
    fingerprint = _fingerprint(ckpt, recipe, seed, rows, plans, dtype)
    if deterministic:  # other statistics bits: not to be mixed with blocks of the default reduction
      fingerprint['deterministic'] = True
    # process 0 prepares the directory (refusal, rest files, trimming); the others then read its manifest
    manifest = _open_output(out, fingerprint, writer) if writer else None
    if writer and 'rest' not in manifest:
      _copy_atomic(Path(ckpt.path) / 'config.json', out / 'config.json')
      records = []
      for key in sorted({p.split('/', 1)[0] for p in ckpt.paths() if not p.startswith(prefix)}):
        # one top-level part (embedding, final norm, head) in memory at a time
        part = ckpt.read(lambda p, key=key: p.split('/', 1)[0] == key)
        records.append(_write_params(out / REST.format(key), part))
        del part
      manifest['rest'] = records
      _write_manifest(out, manifest)
    if writer:
      start = _verified_prefix(out, manifest, n_layers)
      manifest['blocks'] = {k: v for k, v in manifest['blocks'].items() if int(k) < start}
      manifest['complete'] = start == n_layers
      _write_manifest(out, manifest)
    _barrier('output directory ready')
    if not writer:
      manifest = _read_manifest(out)
      if manifest is None or manifest.get('fingerprint') != fingerprint:
        raise ValueError(f"compress_checkpoint: process {pid} computed another fingerprint than process 0 for "
                         f"'{out}'; every process must pass the same input, recipe, seed and options.")
      start = len(manifest['blocks'])
    stop = n_layers if layers is None else min(n_layers, int(layers))
    acts = _ActivationFile(out, rows, model.config.hidden_size, pid)
    if start >= stop:  # nothing to compute: only a partial run's hidden states at `start` are still needed
      acts.keep_only(set() if start >= n_layers else {acts.path(start, m) for m in streams})
      return manifest
    dev_rows = [place.rows(r) for r in rows]
    shardings = place.shardings()
    if plans[0].dense is not None:  # the first stage reads the whole dense model: its pass runs (or ran) first
      dense = manifest.get('dense')
      if dense is None:
        t0 = time.perf_counter()
        summary = _dense_pass(model, ckpt, plans[0], read_block, dev_rows, place, acts, deterministic, on_step)
        dense = {'summary': summary, 'seconds': time.perf_counter() - t0}
        if writer:
          manifest['dense'] = dense
          _write_manifest(out, manifest)
      plans = [plans[0]._replace(compress_block=driver.bind_summary(plans[0].compress_block, dense['summary']),
                                 dense=None), *plans[1:]]
    begin = start
    if not all(acts.valid(start, m, manifest) for m in streams):
      stored = lambda i: core.serialize.load(out / block_file(i))
      begin = _derive(model, ckpt, start, streams, n_stages, read_block, stored, dev_rows, place, acts, on_step,
                      deterministic)
    # a run stopped between its manifest write and the clean-up left the streams of a finished block behind
    acts.keep_only({acts.path(begin, m) for m in streams})

    for i in range(begin, stop):
      t0 = time.perf_counter()
      block = place.replicated(read_block(i))
      held = {0: block} if 0 in streams else {}  # blocks with stages 1..m applied, for stream m's forward
      for k, plan in enumerate(plans):
        h_path = acts.path(i, needs[k])
        first = place.fetch(acts.read(h_path, 0))
        shapes = dict(driver._linear_shapes(model, block, first, dev_rows[0], experts=plan.experts, block_index=i))
        del first
        passes = [tuple(shapes)] if not plan.per_group else driver._group_passes(
            model, {model.block_path: {i: block}}, i, shapes)
        for kernels in passes:
          stats = {p: place.replicated(driver._init_stats(plan.observer, p, shapes[p])) for p in kernels}
          for j, r in enumerate(dev_rows):
            _, stats = driver._block_step(model, plan.observer, block, place.fetch(acts.read(h_path, j)), r, stats,
                                          shardings=shardings, outputs=False, deterministic=deterministic)
            if on_step:
              on_step('stats', i, j)
          stats = {p: stats[p] for p in kernels}
          _release_host_memory()  # what the statistics pass freed, before the solves allocate
          new = plan.compress_block(i, block, jax.block_until_ready(stats))  # as in driver._run
          del stats, block
          block = place.replicated(new)
          del new
          _release_host_memory()
        if k + 1 in streams and k + 1 < n_stages:
          held[k + 1] = block
      solve_seconds = time.perf_counter() - t0
      record = None
      if writer and i >= start:  # below start: recomputed for an earlier stream, already stored and verified
        record = _write_params(out / block_file(i), block)
      _barrier(f'block {i} written')
      del block
      _release_host_memory()
      for m in streams:
        # the last stream runs the block as stored: a resumed run re-derives exactly these hidden states
        block = place.replicated(core.serialize.load(out / block_file(i))) if m == n_stages else held.pop(m)
        _forward(model, block, i, m, dev_rows, place, acts, deterministic, on_step)
        del block
      _release_host_memory()
      digests = _digests(acts, i + 1, streams)
      _barrier(f'hidden states after block {i} written')
      if writer:
        if record is not None:
          record.update(seconds=time.perf_counter() - t0, solve_seconds=solve_seconds)
          manifest['blocks'][str(i)] = record
        manifest['activations'] = {'block': i + 1, 'sha256': digests}
        manifest['complete'] = len(manifest['blocks']) == n_layers
        _write_manifest(out, manifest)
        if on_block and record is not None:
          on_block(i, record)
      for m in streams:
        acts.remove(acts.path(i, m))
    if stop == n_layers:
      for m in streams:
        acts.remove(acts.path(n_layers, m))
  _barrier('compression done')
  return manifest if writer else _read_manifest(out)


def _as_plans(compress_block, observer, per_group) -> list[driver.SequentialPlan]:
  """compress_checkpoint's stages: one (compress_block, observer, per_group) or a sequence of SequentialPlans."""
  if callable(compress_block):
    if not isinstance(observer, Observer):
      raise TypeError(f'compress_checkpoint: observer={observer!r} is not an Observer; use e.g. '
                      'calibration.hessian().')
    return [driver.SequentialPlan(observer=observer, compress_block=compress_block, per_group=per_group)]
  plans = [compress_block] if isinstance(compress_block, driver.SequentialPlan) else (
      list(compress_block) if isinstance(compress_block, (list, tuple)) else [])
  if not plans or not all(isinstance(p, driver.SequentialPlan) and callable(p.compress_block)
                          and isinstance(p.observer, Observer) for p in plans):
    raise TypeError(f'compress_checkpoint: compress_block={compress_block!r} must be a function (block index, '
                    'block params, stats) -> block params, or a non-empty sequence of calibration.SequentialPlan.')
  if observer is not None or per_group:
    raise ValueError('compress_checkpoint: with SequentialPlans, each plan carries its observer and per_group; '
                     'do not pass observer= or per_group=.')
  for k, p in enumerate(plans):
    if p.dense is not None and not (isinstance(p.dense, driver.DensePass) and isinstance(p.dense.observer, Observer)
                                    and callable(p.dense.summarize)):
      raise TypeError(f'compress_checkpoint: stage {k + 1} has dense={p.dense!r}; give a '
                      'calibration.DensePass(observer, summarize) or None.')
    if p.dense is not None and k > 0:
      raise ValueError(f'compress_checkpoint: stage {k + 1} needs a first pass over the whole model as the stages '
                       'before it leave it (a DensePass, e.g. distribution=owl), which block by block exists only '
                       'for the model as read; make it the first stage, or run the stages before it first.')
  return plans


def load_compressed(output_dir: str | os.PathLike) -> dict[str, Any]:
  """The full parameter tree of a finished `compress_checkpoint` output (every file checked against its hash)."""
  params: dict[str, Any] = {}
  for load in compressed_parts(output_dir):
    for k, v in load().items():
      if k in params:  # the blocks, one {i: block} at a time
        params[k].update(v)
      else:
        params[k] = v
  return params


def compressed_parts(output_dir: str | os.PathLike) -> list[Callable[[], dict[str, Any]]]:
  """Loaders of a finished `compress_checkpoint` output a part at a time: first everything outside the blocks
  (embedding, final norm, head), then each block as {block_path: {i: block}}; each file is checked against its
  hash when loaded. What a streamed export (`models.compressed_tensors.export_parts`) reads, one part in memory."""
  out = Path(output_dir)
  manifest = _read_manifest(out)
  if manifest is None or not manifest.get('complete'):
    raise ValueError(f"load_compressed: '{out}' holds no finished compression (manifest.json "
                     f"{'missing' if manifest is None else 'says incomplete'}); run compress_checkpoint again with "
                     'the same arguments to finish it.')

  def load(rec: dict) -> dict[str, Any]:
    if _sha256(out / rec['file']) != rec['sha256']:
      raise ValueError(f"load_compressed: '{out / rec['file']}' does not match the sha256 in the manifest; the "
                       'file was changed or damaged: rerun compress_checkpoint to rewrite it.')
    return core.serialize.load(out / rec['file'])

  def rest() -> dict[str, Any]:
    params: dict[str, Any] = {}
    for rec in manifest['rest']:
      params.update(load(rec))
    return params

  def block(i: int) -> Callable[[], dict[str, Any]]:
    return lambda: {manifest['block_path']: {i: load(manifest['blocks'][str(i)])}}

  return [rest] + [block(i) for i in sorted(int(i) for i in manifest['blocks'])]


# Output directory and manifest -----------------------------------------------------------------------------------


def _fingerprint(ckpt, recipe, seed, rows, plans, dtype) -> dict[str, Any]:
  data = hashlib.sha256()
  for r in rows:
    for x in r:
      if x is not None:
        x = np.ascontiguousarray(np.asarray(x))
        data.update(f'{x.dtype}{x.shape}'.encode())
        data.update(x.tobytes())
  digest = data.hexdigest()
  if jax.process_count() > 1:  # each process passes its own rows: fingerprint them all
    from jax.experimental import multihost_utils
    every = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(digest), np.uint8))
    digest = hashlib.sha256(np.asarray(every).tobytes()).hexdigest()
  try:
    recipe_json = json.loads(json.dumps(recipe, sort_keys=True))
  except TypeError as e:
    raise TypeError(f'compress_checkpoint: recipe={recipe!r} must be JSON-able (configs as dicts: '
                    f'dataclasses.asdict(config)); {e}.') from None
  return {'format': FORMAT, 'input': ckpt.fingerprint(), 'recipe': recipe_json, 'seed': int(seed),
          'data': digest, 'dtype': None if dtype is None else str(np.dtype(dtype)), 'block_path': ckpt.model.block_path,
          'stages': [{'observer': p.observer.init.__qualname__, 'per_group': bool(p.per_group),
                      'calibrate_on': p.calibrate_on,
                      **({} if p.dense is None else {'dense': p.dense.observer.init.__qualname__})} for p in plans]}


def _open_output(out: Path, fingerprint: dict, writer: bool) -> dict[str, Any]:
  """The manifest of a run to continue, or a new one; refuses a directory holding something else."""
  manifest = _read_manifest(out)
  if manifest is not None:
    if manifest.get('fingerprint') != fingerprint:
      diff = sorted(k for k in set(fingerprint) | set(manifest.get('fingerprint', {}))
                    if manifest.get('fingerprint', {}).get(k) != fingerprint.get(k))
      raise ValueError(f"compress_checkpoint: '{out}' holds a compression of another run (its fingerprint differs "
                       f'in {diff}); give an empty or new output_dir, or delete this one to start over.')
  elif out.exists() and any(not p.name.startswith(TMP_PREFIX) for p in out.iterdir()):
    raise ValueError(f"compress_checkpoint: output_dir '{out}' is not empty and has no {MANIFEST}; give an empty "
                     'or new directory.')
  if writer:
    out.mkdir(parents=True, exist_ok=True)
    for p in out.glob(f'{TMP_PREFIX}*'):  # half-written files of a run that died mid-write
      p.unlink()
  if manifest is None:
    manifest = {'fingerprint': fingerprint, 'block_path': fingerprint['block_path'], 'blocks': {},
                'complete': False}
    if writer:
      _write_manifest(out, manifest)
  return manifest


def _read_manifest(out: Path) -> dict | None:
  path = out / MANIFEST
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"'{path}' is unreadable ({e}); it is written atomically, so something else changed it. "
                     'Delete the output directory to start over.') from None


def _write_manifest(out: Path, manifest: dict) -> None:
  _atomic(out / MANIFEST, lambda f: f.write((json.dumps(manifest, indent=1, sort_keys=True) + '\n').encode()))


def _verified_prefix(out: Path, manifest: dict, n_layers: int) -> int:
  """Blocks 0..k-1 whose files exist and match their recorded sha256: the run continues at k."""
  k = 0
  while k < n_layers:
    rec = manifest['blocks'].get(str(k))
    if rec is None or not (out / rec['file']).exists() or _sha256(out / rec['file']) != rec['sha256']:
      break
    k += 1
  return k


def _write_params(path: Path, params) -> dict[str, Any]:
  """core.serialize.save (byte-deterministic) through a temporary file, fsynced and renamed:
  {'file', 'sha256', 'bytes'}."""
  _atomic_path(path, lambda tmp: core.serialize.save(tmp, params))
  return {'file': path.name, 'sha256': _sha256(path), 'bytes': path.stat().st_size}


def _atomic(path: Path, write: Callable[[Any], None]) -> None:
  """write(binary file) into a temporary file beside `path`, fsync, rename over `path`, fsync the directory."""
  def save(tmp):
    with open(tmp, 'wb') as f:
      write(f)
  _atomic_path(path, save)


def _atomic_path(path: Path, save: Callable[[str], None]) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f'{TMP_PREFIX}{path.name}-', dir=path.parent)
  os.close(fd)
  try:
    save(tmp)
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    with contextlib.suppress(OSError):
      os.unlink(f'{tmp}.tmp')  # serialize.save's own temporary name
    raise
  dfd = os.open(path.parent, os.O_RDONLY)
  try:
    os.fsync(dfd)
  finally:
    os.close(dfd)


def _copy_atomic(src: Path, dst: Path) -> None:
  _atomic(dst, lambda f: shutil.copyfileobj(open(src, 'rb'), f))


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def _lean_host_memory() -> None:
  """Buffers of 1 MiB or more come from mmap and go back to the OS when freed (glibc's default threshold
  grows to 32 MiB and keeps freed buffers below it in the heap, where they add to the next phase's peak).
  A process-wide setting (M_MMAP_THRESHOLD); no-op without glibc."""
  try:
    ctypes.CDLL('libc.so.6').mallopt(-3, 1 << 20)
  except (OSError, AttributeError):
    pass


def _release_host_memory() -> None:
  """Hands freed heap memory back to the OS between phases: glibc keeps the freed chunks of XLA's mid-sized
  buffers in its per-thread arenas, and the next phase's peak would stack on them (no-op without glibc)."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# Calibration batches and hidden states --------------------------------------------------------------------------


def _check_batches(batches: Iterable[Any], model=None) -> list[Rows]:
  """Host Rows of every batch, their ids checked against `model`'s vocabulary; all must agree in shape (one
  hidden-state file, one compile), else an error naming the first batch that differs, before any work."""
  rows = [jax.tree.map(np.asarray, driver._as_rows(b, j, model)) for j, b in enumerate(batches)]
  if not rows:
    raise ValueError('compress_checkpoint: batches is empty; give at least one batch of tokens [B, T].')
  sig = lambda r: tuple(None if x is None else (x.shape, str(x.dtype)) for x in r)
  for j, r in enumerate(rows[1:], 1):
    if sig(r) != sig(rows[0]):
      raise ValueError(f'compress_checkpoint: calibration batch {j} has (tokens, attention_mask, token_types) '
                       f'{sig(r)}, batch 0 has {sig(rows[0])}; every batch must have the same shape and fields '
                       '(pad or re-batch them to [B, T]).')
  return rows


class _ActivationFile:
  """Hidden states between blocks: h_XXXXX[_pP].npy [batches, B_local, T, D] float32, read and written one
  batch at a time with positioned I/O (no memory map, whose pages would count as resident)."""

  def __init__(self, out: Path, rows: list[Rows], d: int, pid: int):
    b, t = rows[0].tokens.shape  # with several processes: this process's own rows
    self.out, self.shape, self.pid = out, (len(rows), b, t, d), pid
    self.suffix = f'_p{pid}' if jax.process_count() > 1 else ''
    header = _npy_header(self.shape)
    self.offset = len(header)
    self.header = header

  def path(self, i: int, stream: int) -> Path:
    """Stream `stream`'s hidden states entering block i."""
    return self.out / f'h_{i:05d}_s{stream}{self.suffix}.npy'

  def dense_path(self, i: int) -> Path:
    """The dense model's hidden states entering block i, during a `DensePass`."""
    return self.out / f'd_{i:05d}{self.suffix}.npy'

  def batch_bytes(self) -> int:
    return int(np.prod(self.shape[1:])) * 4

  def read(self, path: Path, j: int) -> np.ndarray:
    with open(path, 'rb') as f:
      f.seek(self.offset + j * self.batch_bytes())
      x = np.fromfile(f, np.float32, int(np.prod(self.shape[1:])))
    if x.size != int(np.prod(self.shape[1:])):
      raise ValueError(f"hidden states file '{path}' is truncated; delete it and rerun (it is re-derived).")
    return x.reshape(self.shape[1:])

  @contextlib.contextmanager
  def writer(self, path: Path):
    """put(j, h [B, T, D]) writes batch j; the file appears under `path` only once every batch is written."""
    fd, tmp = tempfile.mkstemp(prefix=f'{TMP_PREFIX}{path.name}-', dir=self.out)
    try:
      with os.fdopen(fd, 'wb') as f:
        f.write(self.header)

        def put(j, h):
          h = np.ascontiguousarray(np.asarray(h, np.float32))
          if h.shape != self.shape[1:]:
            raise ValueError(f'hidden states of batch {j} have shape {h.shape}, expected {self.shape[1:]}.')
          f.seek(self.offset + j * self.batch_bytes())
          f.write(h.tobytes())

        yield put
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise

  def valid(self, i: int, stream: int, manifest: dict) -> bool:
    """Whether this process's file of `stream` at block i is the one the manifest recorded."""
    rec = manifest.get('activations') or {}
    path = self.path(i, stream)
    if i == 0 or rec.get('block') != i or not path.exists():
      return False
    want = (rec.get('sha256') or {}).get(str(stream)) or []
    return self.pid < len(want) and _sha256(path) == want[self.pid]

  def remove(self, path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
      path.unlink()

  def keep_only(self, keep: set[Path]) -> None:
    """Removes this process's hidden-state files other than `keep` (those of blocks already passed)."""
    mine = re.compile(rf'h_\d{{5}}_s\d+{re.escape(self.suffix)}\.npy')
    for p in self.out.iterdir():
      if mine.fullmatch(p.name) and p not in keep:
        self.remove(p)

  def remove_dense(self) -> None:
    """Removes this process's hidden-state files of a `DensePass` (those an interrupted pass left)."""
    mine = re.compile(rf'd_\d{{5}}{re.escape(self.suffix)}\.npy')
    for p in self.out.iterdir():
      if mine.fullmatch(p.name):
        self.remove(p)


def _npy_header(shape) -> bytes:
  import io
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {'descr': np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                             'fortran_order': False, 'shape': tuple(shape)})
  return buf.getvalue()


def _forward(model, block, i: int, stream: int, dev_rows: list[Rows], place, acts: _ActivationFile,
             deterministic: bool, on_step) -> None:
  """Stream `stream`'s hidden states entering block i, run through `block`, written as those entering i + 1
  (one batch in memory at a time)."""
  shardings = place.shardings()
  with acts.writer(acts.path(i + 1, stream)) as put:
    for j, r in enumerate(dev_rows):
      h = driver._block_step(model, None, block, place.fetch(acts.read(acts.path(i, stream), j)), r, None,
                             shardings=shardings, outputs=True, deterministic=deterministic)[0]
      put(j, place.keep(h))
      del h
      if on_step:
        on_step('forward', i, j)


def _digests(acts: _ActivationFile, i: int, streams: list[int]) -> dict[str, list[str]]:
  """{stream: [sha256 of each process's file at block i]}: every process can verify its own file on resume."""
  mine = [_sha256(acts.path(i, m)) for m in streams]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    raw = np.frombuffer(b''.join(bytes.fromhex(d) for d in mine), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(raw)).reshape(jax.process_count(), len(streams), 32)
    return {str(m): [every[q, k].tobytes().hex() for q in range(every.shape[0])] for k, m in enumerate(streams)}
  return {str(m): [d] for m, d in zip(streams, mine)}


def _embed(model, ckpt, dev_rows: list[Rows], place, acts: _ActivationFile, paths: list[Path], deterministic: bool,
           on_step) -> None:
  """The hidden states entering block 0, written to each of `paths`. Only the top-level parameters outside the
  blocks and heads are read (the embedding, norms); the rest enter the jitted embedding as zeros of their shape,
  which XLA drops since nothing reads them."""
  shapes = model.abstract_params()
  heads = [re.compile(p) for p in model.head_patterns]
  keep = {k for k in shapes if k != model.block_path and not any(h.search(f'{k}/') for h in heads)}
  rest = ckpt.read(lambda p: p.split('/', 1)[0] in keep)
  abstract = {**{k: v for k, v in shapes.items() if k not in keep}, core.SHARED: {}}
  rest_dev = place.replicated(rest)
  embed = driver._embed_step(model, abstract, place.shardings(), deterministic)
  h0 = [place.keep(embed(rest_dev, r)) for r in dev_rows]
  del rest_dev
  for path in paths:
    with acts.writer(path) as put:
      for j, h in enumerate(h0):
        put(j, h)
        if on_step:
          on_step('embed', -1, j)


def _dense_pass(model, ckpt, plan: driver.SequentialPlan, read_block, dev_rows: list[Rows], place,
                acts: _ActivationFile, deterministic: bool, on_step) -> Any:
  """plan.dense's JSON summary: its observer's statistics of every block linear, streamed as `calibrate` gives
  them (each step computes a block's statistics and outputs together, as `calibrate` does, so the bits agree),
  block i fed by blocks 0..i-1 as read; the hidden states on disk (d_XXXXX.npy, one batch in memory), one block
  read at a time, only the statistics kept; then summarize with the weights read back block by block."""
  observer = plan.dense.observer
  shardings = place.shardings()
  prefix = f'{model.block_path}/'
  n_layers = model.config.num_layers
  acts.remove_dense()  # the hidden states of an interrupted pass: it starts over
  _embed(model, ckpt, dev_rows, place, acts, [acts.dense_path(0)], deterministic, on_step)
  kept: dict[str, Any] = {}
  for i in range(n_layers):
    block = place.replicated(read_block(i))
    src = acts.dense_path(i)
    first = place.fetch(acts.read(src, 0))
    shapes = dict(driver._linear_shapes(model, block, first, dev_rows[0], experts=plan.experts, block_index=i))
    del first
    stats = {p: place.replicated(driver._init_stats(observer, p, shapes[p])) for p in shapes}
    with acts.writer(acts.dense_path(i + 1)) as put:
      for j, r in enumerate(dev_rows):
        h, stats = driver._block_step(model, observer, block, place.fetch(acts.read(src, j)), r, stats,
                                      shardings=shardings, outputs=True, deterministic=deterministic)
        put(j, place.keep(h))
        del h
        if on_step:
          on_step('dense', i, j)
    kept.update({f'{prefix}{i}/{p}': place.keep_stats(stats[p]) for p in shapes})  # call order, as calibrate
    del stats, block
    acts.remove(src)
    _release_host_memory()
  acts.remove(acts.dense_path(n_layers))
  summary = plan.dense.summarize(kept, _CheckpointWeights(ckpt, model))
  del kept
  _release_host_memory()
  return driver.as_json(summary, caller='compress_checkpoint')


class _CheckpointWeights(Mapping):
  """{parameter path: host array} read from the checkpoint on access, one block's parameters held at a time (a
  `DensePass` summarize reads the kernels block by block)."""

  def __init__(self, ckpt, model):
    self._ckpt, self._prefix = ckpt, f'{model.block_path}/'
    self._block: tuple[int | None, dict[str, Any]] = (None, {})

  def __getitem__(self, path: str):
    if path not in self._ckpt.paths():
      raise KeyError(path)
    if not path.startswith(self._prefix):
      return core.paths.flatten(self._ckpt.read(lambda p: p == path))[path]
    i = int(path[len(self._prefix):].split('/', 1)[0])
    if self._block[0] != i:
      self._block = (None, {})  # the previous block goes before the next is read
      self._block = (i, core.paths.flatten(self._ckpt.read(lambda p: p.startswith(f'{self._prefix}{i}/'))))
    return self._block[1][path]

  def __iter__(self):
    return iter(self._ckpt.paths())

  def __len__(self) -> int:
    return len(self._ckpt.paths())


def _derive(model, ckpt, start: int, streams: list[int], n_stages: int, read_block, stored, dev_rows: list[Rows],
            place, acts: _ActivationFile, on_step, deterministic: bool) -> int:
  """Hidden states of every stream at block `start`, rebuilt; returns the block the main loop starts at.

  Streams 0 (the blocks as read) and n_stages (the blocks as stored) are run forward through blocks
  0..start-1. A stream in between (some stages applied) exists nowhere on disk: then only the embedding is
  written and the main loop starts at block 0, recomputing those stages (the stored blocks are kept).
  """
  _embed(model, ckpt, dev_rows, place, acts, [acts.path(0, m) for m in streams], deterministic, on_step)
  if any(0 < m < n_stages for m in streams):
    return 0
  for i in range(start):
    for m in streams:
      block = place.replicated(stored(i) if m == n_stages else read_block(i))
      _forward(model, block, i, m, dev_rows, place, acts, deterministic, None)
      del block
      acts.remove(acts.path(i, m))
  return start
