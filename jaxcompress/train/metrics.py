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

Both files are flushed after every write, so a killed process leaves every completed record readable.
TensorBoard files are written without TensorFlow: TFRecord framing and the few `Event` protobuf fields
scalars need are encoded here.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from jaxcompress.eval import plots

JSONL_NAME = 'metrics.jsonl'
TB_DIR = 'tb'
EVENT_FILE_PREFIX = 'events.out.tfevents.'
FILE_VERSION = 'brain.Event:2'
_RESERVED = ('step', 'time')
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


# CRC32C (Castagnoli) and TFRecord framing ----------------------------------------------------------------------


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli polynomial
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (table-driven, pure Python: meant for records of a few hundred bytes)."""
  crc = _U32
  for b in data:
    crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ _U32


def masked_crc32c(data: bytes) -> int:
  """The rotated-and-offset CRC TFRecord stores, so a CRC of data that embeds CRCs stays well mixed."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & _U32


def tfrecord(payload: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, payload, masked CRC of the payload (little-endian)."""
  length = struct.pack('<Q', len(payload))
  return (length + struct.pack('<I', masked_crc32c(length)) + payload
          + struct.pack('<I', masked_crc32c(payload)))


# Event protobuf, hand-encoded --------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
  value &= _U64  # negative int64 values are encoded as their 64-bit two's complement
  out = bytearray()
  while value >= 0x80:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  try:
    return struct.pack('<f', value)
  except OverflowError:  # beyond float32 range: TensorBoard stores float32, so it is +-inf there
    return struct.pack('<f', math.copysign(math.inf, value))


def scalar_summary(values: Mapping[str, float]) -> bytes:
  """Summary { repeated Value value = 1 { string tag = 1; float simple_value = 2; } }."""
  out = b''
  for tag, value in values.items():
    encoded = _length_delimited(1, tag.encode('utf-8')) + _key(2, 5) + _float32(value)
    out += _length_delimited(1, encoded)
  return out


def event(wall_time: float, step: int = 0, *, file_version: str | None = None,
          summary: bytes | None = None, session_start: bool = False) -> bytes:
  """Event { double wall_time = 1; int64 step = 2; oneof { string file_version = 3; Summary summary = 5;
  SessionLog session_log = 7 { SessionStatus status = 1 (START = 1) } } }: give at most one of the three."""
  out = _key(1, 1) + struct.pack('<d', wall_time) + _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode('utf-8'))
  if summary is not None:
    out += _length_delimited(5, summary)
  if session_start:
    out += _length_delimited(7, _key(1, 0) + _varint(1))
  return out


def event_file_name(wall_time: float, *, hostname: str, suffix: str = '') -> str:
  """`events.out.tfevents.{int(time)}.{hostname}{suffix}`, TensorFlow's convention."""
  return f'{EVENT_FILE_PREFIX}{int(wall_time)}.{hostname}{suffix}'


def _event_file_time(name: str) -> int | None:
  head = name[len(EVENT_FILE_PREFIX):].split('.', 1)[0] if name.startswith(EVENT_FILE_PREFIX) else ''
  return int(head) if head.isdigit() else None


_file_counter = itertools.count()


def _new_event_file(tb_dir: Path, wall_time: float) -> tuple[Path, Any]:
  """A fresh event file that sorts after every existing one, since readers replay files in name order."""
  existing = [t for t in (_event_file_time(p.name) for p in tb_dir.iterdir()) if t is not None]
  stamp = max([int(wall_time)] + [t + 1 for t in existing])
  hostname = socket.gethostname() or 'localhost'
  while True:
    path = tb_dir / event_file_name(stamp, hostname=hostname, suffix=f'.{os.getpid()}.{next(_file_counter)}')
    try:
      return path, open(path, 'xb')
    except FileExistsError:
      continue


# metrics.jsonl -----------------------------------------------------------------------------------------------


def _parse_lines(text: str, path: Path) -> list[tuple[str, dict]]:
  """(line, record) for every line; text after the last newline counts only if it is a whole JSON object."""
  lines = text.split('\n')
  complete, tail = lines[:-1], lines[-1]  # tail: a write cut short, or a record whose newline never came
  out = []
  for number, line in enumerate(complete, start=1):
    if line.strip():
      out.append((line, _parse_record(line, path, number)))
  if tail.strip():
    try:
      out.append((tail, _parse_record(tail, path, len(lines))))
    except ValueError:
      pass  # truncated mid-record: a prefix of a JSON object never parses as one
  return out


def _parse_record(line: str, path: Path, number: int) -> dict:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: line {number} is not valid JSON ({e}); only a truncated last line is skipped, '
                     'so fix or remove that line.') from None
  if not isinstance(record, dict):
    raise ValueError(f'{path}: line {number} holds a JSON {type(record).__name__}, not an object; each line of '
                     'a metrics file must be one {"step": ..., ...} object.')
  return record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """Records of a metrics.jsonl in file order, skipping a truncated last line (a writer killed mid-write)."""
  path = Path(path)
  return [record for _, record in _parse_lines(path.read_text(encoding='utf-8'), path)]


def latest_by_step(records: Iterable[Mapping[str, Any]]) -> list[dict]:
  """One record per step, in step order: every key's last value written at that step (train and eval records
  of one step merge); records without a step are left out."""
  by_step: dict[int, dict] = {}
  for record in records:
    if 'step' in record:
      by_step.setdefault(int(record['step']), {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _prepare_jsonl(path: Path, resume_step: int | None) -> None:
  """Drop records after `resume_step` and any cut-short last line, so appending continues a clean file."""
  if not path.exists():
    return
  text = path.read_text(encoding='utf-8')
  parsed = _parse_lines(text, path)
  kept = [line for line, record in parsed
          if resume_step is None or 'step' not in record or int(record['step']) <= resume_step]
  clean = ''.join(line + '\n' for line in kept)
  if clean != text:
    _atomic_write(path, clean)


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
  """Scalars to `run_dir/metrics.jsonl` and TensorBoard events under `run_dir/tb/`.

  Each `write` appends one line {"step": int, "time": unix seconds, name: value, ...} (NaN and inf are kept,
  as Python's json writes them) and one TensorBoard event, both flushed to the OS at once: a killed process
  loses nothing it finished writing (a machine crash may still lose what the OS had not stored).
  enabled=False (processes other than 0 of a multi-host job): every method does nothing, no file is made.
  resume_step=s: records with step > s, written before a crash, are removed from metrics.jsonl, and the new
  event file starts with a SessionLog START at step s + 1, which tells TensorBoard to drop its later steps.
  """

  def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
               clock: Callable[[], float] = time.time):
    self.enabled = enabled
    self._clock = clock
    self._jsonl: TextIO | None = None
    self._events = None
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
    now = clock()
    self.event_path, self._events = _new_event_file(tb_dir, now)
    self._write_event(event(now, file_version=FILE_VERSION))
    if resume_step is not None:
      self._write_event(event(now, int(resume_step) + 1, session_start=True))

  def _write_event(self, payload: bytes) -> None:
    self._events.write(tfrecord(payload))
    self._events.flush()

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
      self._write_event(event(now, step, summary=scalar_summary(values)))

  def close(self) -> None:
    """Close both files; later calls do nothing."""
    for f in (self._jsonl, self._events):
      if f is not None:
        f.close()
    self._jsonl = self._events = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# Progress ----------------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
  """Seconds as H:MM:SS ('-' when unknown)."""
  if not math.isfinite(seconds) or seconds < 0:
    return '-'
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def format_count(value: float) -> str:
  """3 significant digits with a k/M/G suffix: 1234 -> '1.23k' ('-' when unknown)."""
  if not math.isfinite(value):
    return '-'
  for scale, unit in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g}{unit}'
  return f'{value:.3g}'


class Progress:
  """One status line for a long loop: step/total, percent, tokens/s, elapsed, ETA and a few metrics.

  On a terminal the line is redrawn in place ('\\r'); otherwise (logs, pipes) a plain line is printed at most
  every `every_seconds`, plus the last step. Rates are measured over the updates of the last `window_seconds`,
  so compilation and other one-off pauses fade out. Enable it on process 0 only.
  stream: None is sys.stderr as it is when the Progress is made. keys: the metrics shown, those present in
  each update, in this order; None shows the first `max_metrics` given. clock: seconds, for tests.
  """

  def __init__(self, total_steps: int, *, enabled: bool = True, every_seconds: float = 10.0,
               stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
               window_seconds: float = 60.0, keys: Sequence[str] | None = ('loss', 'grad_norm', 'lr'),
               max_metrics: int = 4):
    if total_steps < 1:
      raise ValueError(f'total_steps={total_steps} must be >= 1.')
    if every_seconds < 0 or window_seconds <= 0:
      raise ValueError(f'every_seconds={every_seconds} must be >= 0 and window_seconds={window_seconds} > 0.')
    self.total_steps = int(total_steps)
    self.enabled = enabled
    self.every_seconds = every_seconds
    self.window_seconds = window_seconds
    self.keys = None if keys is None else tuple(keys)
    self.max_metrics = max_metrics
    self._stream = sys.stderr if stream is None else stream
    self._clock = clock
    self._tty = enabled and _isatty(self._stream)
    self._start = clock()
    self._samples: collections.deque[tuple[float, int, int]] = collections.deque()  # (time, step, tokens so far)
    self._last_shown = -math.inf
    self._pending = ''  # the newest line not yet printed (non-terminal streams)
    self._width = 0

  def rates(self) -> tuple[float, float]:
    """(steps/s, tokens/s) over the recent window; nan until two updates are apart in time."""
    if len(self._samples) < 2:
      return math.nan, math.nan
    (t0, s0, k0), (t1, s1, k1) = self._samples[0], self._samples[-1]
    if t1 <= t0:
      return math.nan, math.nan
    return (s1 - s0) / (t1 - t0), (k1 - k0) / (t1 - t0)

  def eta(self) -> float:
    """Seconds until total_steps at the recent step rate (nan when unknown)."""
    if not self._samples:
      return math.nan
    remaining = self.total_steps - self._samples[-1][1]
    if remaining <= 0:
      return 0.0
    steps_per_s, _ = self.rates()
    return remaining / steps_per_s if steps_per_s > 0 else math.nan

  def line(self, metrics: Mapping[str, Any] | None = None) -> str:
    """The status text for the latest update."""
    step = self._samples[-1][1] if self._samples else 0
    _, tokens_per_s = self.rates()
    parts = [f'step {step}/{self.total_steps}', f'{100.0 * step / self.total_steps:5.1f}%',
             f'{format_count(tokens_per_s)} tok/s',
             f'elapsed {format_duration(self._samples[-1][0] - self._start if self._samples else 0.0)}',
             f'eta {format_duration(self.eta())}']
    metrics = metrics or {}
    names = list(metrics) if self.keys is None else [k for k in self.keys if k in metrics]
    parts += [f'{name} {_format_metric(metrics[name])}' for name in names[:self.max_metrics]]
    return '  '.join(parts)

  def update(self, step: int, tokens: int = 0, metrics: Mapping[str, Any] | None = None) -> None:
    """Record that `step` steps are done and `tokens` tokens processed in all so far (a running total)."""
    if not self.enabled:
      return
    now = self._clock()
    self._samples.append((now, int(step), int(tokens)))
    while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_seconds:
      self._samples.popleft()  # keep one sample at or before the window start as the rate's anchor
    text = self.line(metrics)
    last = int(step) >= self.total_steps
    if self._tty:
      if last or now - self._last_shown >= 0.1:  # a terminal need not redraw faster than the eye reads
        self._draw(text, now)
      else:
        self._pending = text
    elif last or now - self._last_shown >= self.every_seconds:
      self._print(text, now)
    else:
      self._pending = text

  def _draw(self, text: str, now: float) -> None:
    self._stream.write('\r' + text + ' ' * max(self._width - len(text), 0))
    self._stream.flush()
    self._width, self._last_shown, self._pending = len(text), now, ''

  def _print(self, text: str, now: float) -> None:
    self._stream.write(text + '\n')
    self._stream.flush()
    self._last_shown, self._pending = now, ''

  def close(self) -> None:
    """Show the latest state and end the line."""
    if not self.enabled:
      return
    if self._tty:
      if self._pending:
        self._draw(self._pending, self._clock())
      if self._width:
        self._stream.write('\n')
        self._stream.flush()
      self._width = 0
    elif self._pending:
      self._print(self._pending, self._clock())
    self.enabled = False

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


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


def plot_metrics(jsonl_path: str | os.PathLike, svg_path: str | os.PathLike, keys: Sequence[str] = ('loss',),
                 *, log_y: bool = False, title: str | None = None) -> Path:
  """Chart metrics `keys` against step from a metrics.jsonl (the last record of each step); returns svg_path.

  title: None uses the name of the run directory holding the file.
  """
  if isinstance(keys, str):
    keys = (keys,)
  records = latest_by_step(read_jsonl(jsonl_path))
  present = sorted({k for r in records for k in r} - {'step', 'time'})
  missing = [k for k in keys if k not in present]
  if not keys or missing:
    raise ValueError(f'keys={tuple(keys)}: {missing or "none given"} not in {jsonl_path}; '
                     f'metrics there: {present}.')
  series = {k: ([r['step'] for r in records if k in r], [r[k] for r in records if k in r]) for k in keys}
  title = Path(jsonl_path).resolve().parent.name if title is None else title
  y_label = keys[0] if len(keys) == 1 else ''
  return plots.line_chart_svg(series, svg_path, title=title, x_label='step', y_label=y_label, log_y=log_y)
