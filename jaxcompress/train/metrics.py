"""Training metrics on disk and on screen: metrics.jsonl, TensorBoard event files, and a progress line.

    writer = MetricsWriter(run_dir, enabled=jax.process_index() == 0, resume_step=restored_step)
    progress = Progress(total_steps, enabled=jax.process_index() == 0)
    with writer:
      for step in range(start, total_steps):
        state, metrics = train_step(state, batch)
        writer.write(step + 1, metrics, prefix='train')
        tokens += batch_tokens
        progress.update(step + 1, tokens=tokens, metrics=metrics)
    progress.close()

metrics.jsonl is ours (one JSON object a line, trimmed on resume); TensorBoard events go through TensorBoard's own
record writer and event protos, the progress line through tqdm, plots through matplotlib. Both files are flushed
after every write, so a killed process leaves every completed record readable.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from absl import logging

from jaxcompress import provenance
from jaxcompress.eval import plots

JSONL_NAME = 'metrics.jsonl'
TB_DIR = 'tb'
EVENT_FILE_PREFIX = 'events.out.tfevents.'
_RESERVED = ('step', 'time')


# metrics.jsonl -----------------------------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Records of a metrics.jsonl in file order, skipping a truncated last line (a writer killed mid-write)."""
  return provenance.read_jsonl(path)


def latest_by_step(records: Iterable[Mapping[str, Any]]) -> list[dict]:
  """One record per step, in step order: every key's last value written at that step (train and eval records
  of one step merge); records without a step are left out."""
  by_step: dict[int, dict] = {}
  for record in records:
    if 'step' in record:
      by_step.setdefault(int(record['step']), {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def _prepare_jsonl(path: Path, resume_step: int | None) -> None:
  """Drop records after `resume_step` and any cut-short last line, so appending continues a clean file."""
  if not path.exists():
    return
  text = path.read_text(encoding='utf-8')
  kept = [line for _, line, record in provenance.parse_jsonl(text, path)
          if resume_step is None or 'step' not in record or int(record['step']) <= resume_step]
  clean = ''.join(line + '\n' for line in kept)
  if clean != text:
    provenance.atomic_write(path, clean)


def set_aside_log(run_dir: str | os.PathLike) -> Path | None:
  """Renames an existing run_dir/metrics.jsonl to metrics.jsonl.<n> (n = 1, 2, ...) with a warning.

  For a run that starts from step 0 in a directory with records of earlier steps (its checkpoints were
  deleted, or resume=False): trimming to step 0 would silently erase them. Returns the new path, or None when
  there was nothing to keep.
  """
  path = Path(run_dir) / JSONL_NAME
  if not path.exists() or not path.read_text(encoding='utf-8').strip():
    return None
  n = 1
  while (dst := path.with_name(f'{JSONL_NAME}.{n}')).exists():
    n += 1
  path.rename(dst)
  logging.warning('%s holds records of an earlier run but no checkpoint is resumed; moved it to %s.', path, dst)
  return dst


def _as_float(name: str, value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    shape = getattr(value, 'shape', None)
    raise ValueError(f'metric {name!r} = {value!r} (shape {shape}) is not a scalar; pass a Python or NumPy '
                     'scalar or a 0-d / size-1 array, e.g. reduce it with .mean() first.') from None


def scalars(metrics: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  """{name: float}, names prefixed `prefix/name` when a prefix is given; jax/NumPy scalars become floats."""
  out = {}
  for name, value in metrics.items():
    key = f"{prefix.rstrip('/')}/{name}" if prefix else str(name)
    if key in _RESERVED:
      raise ValueError(f'metric name {key!r} is reserved for the record itself; rename it or pass a prefix.')
    out[key] = _as_float(key, value)
  return out


class MetricsWriter:
  """Scalars to `run_dir/metrics.jsonl` and TensorBoard events under `run_dir/tb/` (TensorBoard's record format).

  Each `write` appends one line {"step": int, "time": unix seconds, name: value, ...} (NaN and inf are kept,
  as Python's json writes them) and one TensorBoard scalar per value, both flushed to the OS at once: a killed
  process loses nothing it finished writing (a machine crash may still lose what the OS had not stored).
  enabled=False (processes other than 0 of a multi-host job): every method does nothing, no file is made.
  resume_step=s: records with step > s, written before a crash, are removed from metrics.jsonl, and the new
  event file starts with a SessionLog START at step s + 1, which tells TensorBoard to drop its later steps.
  """

  def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
               clock: Callable[[], float] = time.time):
    self.enabled = enabled
    self._clock = clock
    self._jsonl: TextIO | None = None
    self._tb = None
    if not enabled:
      return
    if resume_step is not None and int(resume_step) < 0:
      raise ValueError(f'resume_step={resume_step} must be >= 0 (the step of the checkpoint resumed from), '
                       'or None for a fresh run.')
    self.run_dir = Path(run_dir)
    self.jsonl_path = self.run_dir / JSONL_NAME
    tb_dir = self.run_dir / TB_DIR
    tb_dir.mkdir(parents=True, exist_ok=True)
    _prepare_jsonl(self.jsonl_path, None if resume_step is None else int(resume_step))
    self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
    # TensorBoard's RecordWriter over a plain file: each event is written and flushed before `write` returns (the
    # library's EventFileWriter queues events for a thread). TensorBoard replays a directory's files in name order;
    # the name carries the second and then a sequence number, which orders two writers started within one second.
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.summary.writer.record_writer import RecordWriter
    count = sum(1 for p in tb_dir.iterdir() if p.name.startswith(EVENT_FILE_PREFIX))
    name = f'{EVENT_FILE_PREFIX}{int(clock()):010d}.{socket.gethostname()}.{count:06d}'
    self._tb = RecordWriter(open(tb_dir / name, 'wb'))
    self._write_event(Event(wall_time=clock(), file_version='brain.Event:2'))
    if resume_step is not None:
      self._write_event(Event(wall_time=clock(), step=int(resume_step) + 1,
                              session_log=SessionLog(status=SessionLog.START)))

  def _write_event(self, event) -> None:
    self._tb.write(event.SerializeToString())
    self._tb.flush()

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = '') -> None:
    """Record scalar `metrics` at `step`; names become `prefix/name` when a prefix is given."""
    if not self.enabled:
      return
    if self._jsonl is None:
      raise ValueError('MetricsWriter.write after close(); write before closing or open a new writer.')
    step = int(step)
    if step < 0:
      raise ValueError(f'step={step} must be >= 0.')
    values = scalars(metrics, prefix)
    now = self._clock()
    self._jsonl.write(json.dumps({'step': step, 'time': now, **values}) + '\n')
    self._jsonl.flush()
    if values:
      from tensorboard.compat.proto.event_pb2 import Event
      from tensorboard.compat.proto.summary_pb2 import Summary
      summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(x)) for tag, x in values.items()])
      self._write_event(Event(wall_time=now, step=step, summary=summary))

  def close(self) -> None:
    """Close both files; later calls do nothing."""
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    self._jsonl = self._tb = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# Progress ----------------------------------------------------------------------------------------------------


class Progress:
  """One tqdm status line for a long loop: step/total, percent, elapsed, ETA, tokens/s and a few metrics.

  On a terminal tqdm redraws the line in place; elsewhere (logs, pipes) it prints at most every
  `every_seconds`. Enable it on process 0 only. stream: None is sys.stderr. keys: the metrics shown, those
  present in each update, in this order (the learning rate as 'lr'); None shows the first `max_metrics`.
  """

  def __init__(self, total_steps: int, *, enabled: bool = True, every_seconds: float = 10.0,
               stream: TextIO | None = None, initial: int = 0,
               keys: Sequence[str] | None = ('loss', 'grad_norm', 'lr'), max_metrics: int = 4):
    if total_steps < 1:
      raise ValueError(f'total_steps={total_steps} must be >= 1.')
    if every_seconds < 0:
      raise ValueError(f'every_seconds={every_seconds} must be >= 0.')
    self.total_steps = int(total_steps)
    self.enabled = enabled
    self.keys = None if keys is None else tuple(keys)
    self.max_metrics = max_metrics
    self._bar = None
    self._tokens0 = None
    self._time0 = None
    if not enabled:
      return
    from tqdm.auto import tqdm
    stream = sys.stderr if stream is None else stream
    tty = _isatty(stream)
    self._bar = tqdm(total=self.total_steps, initial=int(initial), unit='step', file=stream, dynamic_ncols=tty,
                     mininterval=0.1 if tty else every_seconds, ascii=not tty, leave=True)

  def postfix(self, tokens_per_s: float, metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """The fields after the bar: tokens/s, then the chosen metrics."""
    metrics = metrics or {}
    names = list(metrics) if self.keys is None else [k for k in self.keys if k in metrics]
    out = {'tok/s': format_count(tokens_per_s)}
    out.update({name: _format_metric(metrics[name]) for name in names[:self.max_metrics]})
    return out

  def update(self, step: int, tokens: int = 0, metrics: Mapping[str, Any] | None = None) -> None:
    """Record that `step` steps are done and `tokens` tokens processed in all so far (a running total)."""
    if not self.enabled:
      return
    now = time.monotonic()
    if self._tokens0 is None:  # the first update includes compilation: rates count from it
      self._tokens0, self._time0 = tokens, now
    rate = (tokens - self._tokens0) / (now - self._time0) if now > self._time0 else math.nan
    self._bar.set_postfix(self.postfix(rate, metrics), refresh=False)
    self._bar.update(int(step) - self._bar.n)

  def close(self) -> None:
    """Show the latest state and end the line."""
    if self._bar is not None:
      self._bar.close()
    self._bar, self.enabled = None, False

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def format_count(value: float) -> str:
  """3 significant digits with a k/M/G suffix: 1234 -> '1.23k' ('-' when unknown)."""
  if not math.isfinite(value):
    return '-'
  for scale, unit in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g}{unit}'
  return f'{value:.3g}'


def _isatty(stream: Any) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


def _format_metric(value: Any) -> str:
  try:
    return f'{float(value):.4g}'
  except (TypeError, ValueError):
    return str(value)


def plot_metrics(jsonl_path: str | os.PathLike, png_path: str | os.PathLike, keys: Sequence[str] = ('loss',),
                 *, log_y: bool = False, title: str | None = None) -> Path:
  """Chart metrics `keys` against step from a metrics.jsonl (the last record of each step) as a PNG;
  returns png_path. title: None uses the name of the run directory holding the file.
  """
  if isinstance(keys, str):
    keys = (keys,)
  return plots.line_chart(metric_series(jsonl_path, keys), png_path, title=_title(jsonl_path, title),
                          x_label='step', y_label=keys[0] if len(keys) == 1 else '', log_y=log_y)


def metric_series(jsonl_path: str | os.PathLike, keys: Sequence[str]) -> dict[str, tuple[list, list]]:
  """{key: (steps, values)} from a metrics.jsonl, the last value written at each step."""
  records = latest_by_step(read_jsonl(jsonl_path))
  present = sorted({k for r in records for k in r} - {'step', 'time'})
  missing = [k for k in keys if k not in present]
  if not keys or missing:
    raise ValueError(f'keys={tuple(keys)}: {missing or "none given"} not in {jsonl_path}; '
                     f'metrics there: {present}.')
  return {k: ([r['step'] for r in records if k in r], [r[k] for r in records if k in r]) for k in keys}


def _title(jsonl_path: str | os.PathLike, title: str | None) -> str:
  return Path(jsonl_path).resolve().parent.name if title is None else title
